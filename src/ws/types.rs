//! Small types shared by the public API.

pub use crate::handler::{ConnectionId, Topic};
pub use crate::sink::{SendError, WsSink};
