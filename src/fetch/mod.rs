//! Fleet delivery: getting bundles and channel indexes from the network, and deciding.
//!
//! - [`http`]: the resuming HTTP(S) source and the client (retries, timeouts, proxies).
//! - [`channel`]: the signed channel index, the install decision, the download cache.
//! - [`update`]: `check` and `update`: ask the channel, decide, then install or download.

pub mod channel;
pub mod http;
pub mod update;
