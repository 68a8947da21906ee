// SPDX-License-Identifier: Apache-2.0

//! The command line side of the `cloud-hypervisor` binary: Cloud
//! Hypervisor's option syntax, its flags, and its logger.

pub mod cli;
pub mod logger;
pub mod option_parser;
