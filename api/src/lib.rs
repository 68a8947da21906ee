//! The REST API: an HTTP/1.1 server on a Unix socket whose requests travel as messages to the
//! VMM control loop, the request/response types, and the client `ch-remote` uses.
//!
//! Empty until the API work lands; `--api-socket` is parsed already.
