//! The REST API: an HTTP/1.1 server on a Unix socket with Cloud Hypervisor's endpoints
//! (`/api/v1/vmm.*`, `/api/v1/vm.*`), whose requests travel as messages to the VMM control
//! loop, and the client `ch-remote` uses.
//!
//! - [`http`]: request-head parsing (httparse) and limits, response serialization.
//! - [`routes`]: endpoint table, request -> [`vmm::control::VmmRequest`], answer -> status/body.
//! - [`server`]: listener set-up (path or inherited fd), accept thread, connection threads.
//! - [`client`]: one request over a Unix socket.
//!
//! The API threads never touch VM state: everything goes through
//! [`vmm::control::ApiSender::call`].

// The ft-status test spells out every field in one `json!`, deeper than the default limit.
#![cfg_attr(test, recursion_limit = "256")]

pub mod client;
pub mod http;
pub mod routes;
pub mod server;

pub use routes::{Backend, Endpoint, ENDPOINTS};
pub use server::{
    bind, listener_from_fd, spawn_server, start_server, ApiServer, BindError, IdleWaiter,
    ServerOptions,
};
