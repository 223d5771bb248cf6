//! Integration tests: the emulator and the gateway in-process on ephemeral
//! ports, talked to over real TLS (HTTP/1.1 and HTTP/2).

mod access_log;
mod audit;
mod auth;
mod binary;
mod caching;
mod deploy;
mod edge;
mod faults;
mod forwarding;
mod hostile;
mod identity;
mod lifecycle;
mod metrics;
mod mtls;
mod protection;
mod rate_limit;
mod reload;
mod shared_limits;
mod support;
mod validation;
