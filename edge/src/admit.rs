//! Connection caps: the per-IP connection rate and the node, per-IP and per-user caps, held
//! as a [`Slot`] from accept until the socket closes.

use crate::metrics as m;
use crate::state::EdgeState;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use std::sync::Arc;

pub(crate) fn refuse(status: StatusCode, reason: &'static str, body: &'static str) -> Response {
    metrics::counter!(m::HANDSHAKE_REJECTED, "reason" => reason).increment(1);
    (status, body).into_response()
}

/// A refusal before any HTTP is read: status, metric reason, body.
pub type Refused = (StatusCode, &'static str, &'static str);

/// The address a client is counted under: IPv4 (also when IPv4-mapped), or the /64 of an IPv6
/// address (one host usually holds a whole /64).
pub fn client_key(ip: std::net::IpAddr) -> std::net::IpAddr {
    match ip {
        std::net::IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => std::net::IpAddr::V4(v4),
            None => std::net::IpAddr::V6(std::net::Ipv6Addr::from(u128::from(v6) & !((1u128 << 64) - 1))),
        },
        v4 => v4,
    }
}

/// Holds one slot of the connection caps from accept until the socket closes (so connections
/// still in their TLS or HTTP handshake count too); released on drop.
pub struct Slot {
    st: Arc<EdgeState>,
    ip: std::net::IpAddr,
    user: Option<String>,
}

/// The connection's slot, handed from the accept loop to the upgrade through the request.
#[derive(Clone)]
pub struct ConnSlot(pub Arc<parking_lot::Mutex<Option<Slot>>>);

impl Slot {
    /// At accept: the per-IP connection rate, then the node and per-IP caps.
    pub fn admit(st: &Arc<EdgeState>, peer: std::net::IpAddr) -> Result<Slot, Refused> {
        use std::sync::atomic::Ordering;
        let ip = client_key(peer);
        if st.ip_rate.as_ref().is_some_and(|l| l.check_key(&ip).is_err()) {
            return Err((
                StatusCode::TOO_MANY_REQUESTS,
                "ip_rate",
                "connecting too fast from this address\n",
            ));
        }
        if st.open.fetch_add(1, Ordering::AcqRel) >= st.cfg.max_connections {
            st.open.fetch_sub(1, Ordering::AcqRel);
            return Err((
                StatusCode::SERVICE_UNAVAILABLE,
                "node_cap",
                "node at its connection cap\n",
            ));
        }
        let mut n = st.per_ip.entry(ip).or_insert(0);
        if *n >= st.cfg.max_connections_per_ip {
            drop(n);
            st.open.fetch_sub(1, Ordering::AcqRel);
            return Err((
                StatusCode::TOO_MANY_REQUESTS,
                "ip_cap",
                "too many connections from this address\n",
            ));
        }
        *n += 1;
        Ok(Slot {
            st: st.clone(),
            ip,
            user: None,
        })
    }

    /// Also takes a slot of the subject's per-user cap (counted per route: the same `sub` from
    /// another route's issuer or API-key file is another user).
    // The refusal is the response itself (built only when a request is refused).
    #[allow(clippy::result_large_err)]
    pub(crate) fn add_user(&mut self, route: &str, subject: &str) -> Result<(), Response> {
        let key = format!("{route}\u{0}{subject}");
        let mut n = self.st.per_user.entry(key.clone()).or_insert(0);
        if *n >= self.st.cfg.max_connections_per_user {
            drop(n);
            self.st.per_user.remove_if(&key, |_, n| *n == 0);
            return Err(refuse(
                StatusCode::TOO_MANY_REQUESTS,
                "user_cap",
                "too many connections for this user\n",
            ));
        }
        *n += 1;
        self.user = Some(key);
        Ok(())
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.st.open.fetch_sub(1, std::sync::atomic::Ordering::AcqRel);
        self.st.per_ip.remove_if_mut(&self.ip, |_, n| {
            *n -= 1;
            *n == 0
        });
        if let Some(u) = &self.user {
            self.st.per_user.remove_if_mut(u, |_, n| {
                *n -= 1;
                *n == 0
            });
        }
    }
}
#[cfg(test)]
mod tests {
    use super::client_key;

    #[test]
    fn clients_are_counted_per_ipv4_address_and_per_ipv6_64() {
        let k = |s: &str| client_key(s.parse().unwrap()).to_string();
        assert_eq!(k("192.0.2.7"), "192.0.2.7");
        assert_eq!(k("::ffff:192.0.2.7"), "192.0.2.7");
        assert_eq!(k("2001:db8:1:2:aaaa:bbbb:cccc:dddd"), "2001:db8:1:2::");
        assert_eq!(k("2001:db8:1:2::1"), k("2001:db8:1:2:ffff::9"));
        assert_ne!(k("2001:db8:1:2::1"), k("2001:db8:1:3::1"));
    }
}
