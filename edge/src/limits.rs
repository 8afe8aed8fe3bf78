//! Per-connection rate limits: the frame-flood budgets ([`FrameLimits`], charged by the frame
//! parser through [`FloodBudget`]) and the one clock every governor limiter runs on.

use governor::{DefaultDirectRateLimiter, Quota, RateLimiter};
use std::num::NonZeroU32;
use switchyard_protocol::ws::{Budget, Flood, FrameKind};

/// Per-connection frame budgets (frames per second; the burst equals the rate).
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::Args)]
pub struct FrameLimits {
    /// Frames per second per socket, any kind incl. continuation (past it: close 1008)
    #[arg(
        long = "max-frames-per-second",
        env = "SWITCHYARD_MAX_FRAMES_PER_SECOND",
        default_value_t = 20_000,
        global = true
    )]
    pub frames_per_second: u32,
    /// Control frames (ping, pong, close) per second per socket (past it: close 1008)
    #[arg(
        long = "max-control-frames-per-second",
        env = "SWITCHYARD_MAX_CONTROL_FRAMES_PER_SECOND",
        default_value_t = 100,
        global = true
    )]
    pub control_per_second: u32,
}

impl Default for FrameLimits {
    fn default() -> Self {
        switchyard_bus::flag_defaults()
    }
}

/// The process's one clock for rate limiters. A new `quanta` clock calibrates itself with
/// CPUID, which is slow (a VM exit under virtualisation): once per process, not per socket.
pub fn clock() -> governor::clock::QuantaClock {
    static CLOCK: std::sync::OnceLock<governor::clock::QuantaClock> = std::sync::OnceLock::new();
    CLOCK.get_or_init(Default::default).clone()
}

/// A per-connection (unkeyed) rate limiter on the shared clock.
pub fn direct_limiter(quota: Quota) -> DefaultDirectRateLimiter {
    RateLimiter::direct_with_clock(quota, clock())
}

fn limiter(per_second: u32) -> DefaultDirectRateLimiter {
    let n = NonZeroU32::new(per_second.max(1)).expect("non-zero");
    direct_limiter(Quota::per_second(n).allow_burst(n))
}

/// A socket's frame budgets, charged by the frame parser for every frame header: every frame
/// to the frames budget, control frames to the control budget too. Empty continuation frames
/// and pings never surface as published messages, so they are counted here.
pub struct FloodBudget {
    all: DefaultDirectRateLimiter,
    control: DefaultDirectRateLimiter,
}

impl FloodBudget {
    pub fn new(limits: FrameLimits) -> Self {
        Self {
            all: limiter(limits.frames_per_second),
            control: limiter(limits.control_per_second),
        }
    }
}

impl Budget for FloodBudget {
    fn charge(&mut self, kind: FrameKind) -> Result<(), Flood> {
        if self.all.check().is_err() {
            return Err(Flood::Frames);
        }
        if kind == FrameKind::Control && self.control.check().is_err() {
            return Err(Flood::Control);
        }
        Ok(())
    }
}
