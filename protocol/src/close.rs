//! WebSocket close codes used by Switchyard. docs/protocol.md lists the same table.

/// Normal closure (client or backend asked for it).
pub const NORMAL: u16 = 1000;
/// The connection ended without a close frame (never sent on the wire; reported in
/// disconnect records, e.g. for the sessions of a node whose lease lapsed).
pub const ABNORMAL: u16 = 1006;
/// The node is shutting down, or the socket was idle past the idle timeout.
pub const GOING_AWAY: u16 = 1001;
/// The client broke the WebSocket protocol (bad framing, an unmasked frame, reserved bits, ...).
pub const PROTOCOL_ERROR: u16 = 1002;
/// A text frame carried invalid UTF-8.
pub const INVALID_PAYLOAD: u16 = 1007;
/// Policy violation (e.g. a framed-route client sent something that is not the framed protocol).
pub const POLICY: u16 = 1008;
/// A message exceeded the route's `max_message_size`.
pub const TOO_BIG: u16 = 1009;
/// The node lost its lease in the session registry (its sessions were ended): reconnect.
pub const SERVICE_RESTART: u16 = 1012;
/// An internal error on the node.
pub const INTERNAL: u16 = 1011;
/// The bus could not take a frame (buffer full or bus unavailable); retry later.
pub const TRY_AGAIN_LATER: u16 = 1013;
/// The socket did not drain its queue fast enough and the route's policy is `close`.
pub const SLOW_CONSUMER: u16 = 4008;
/// The credential the socket was opened with expired.
pub const TOKEN_EXPIRED: u16 = 4001;
