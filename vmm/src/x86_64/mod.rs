//! x86_64 specifics: the guest physical memory map, CPUID/MSR set-up, boot register state,
//! boot parameter blocks, the MP table and the ACPI tables.

pub mod acpi;
pub mod boot;
pub mod cpu_state;
pub mod cpuid;
pub mod layout;
pub mod mptable;
pub mod msr;
pub mod regs;
