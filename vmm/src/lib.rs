//! The virtual machine monitor: VM lifecycle, KVM VM and vCPUs, guest memory, x86_64 boot and
//! the control loop that owns the VM.

pub mod config;
pub mod console;
pub mod control;
pub mod device_loop;
pub mod device_manager;
pub mod dirty_log;
pub mod event_monitor;
pub mod fault_tolerance;
pub mod hotplug;
pub mod kvm_routing;
pub mod kvm_stats;
pub mod memory;
pub mod migration;
pub mod progress;
pub mod seccomp;
pub mod unix_socket;
pub mod vcpu;
pub mod vm;
pub mod vmm;
pub mod x86_64;

pub use seccomp::SeccompMode;
pub use vmm::{run, ApiReceiver, ExitReason, RunError, VmmOptions};
