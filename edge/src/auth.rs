//! Handshake authentication: JWT (HS256, RS256, ES256, EdDSA) with an explicit algorithm
//! allowlist, exp / nbf / aud / iss checked, or a static API key. Keys come from a PEM file, a
//! secret file or a JWKS file (selected by `kid`), loaded once at config time. Tokens are never
//! logged. Claims named by the route grant channel permissions (see `config::ChannelRules`).

use jsonwebtoken::{decode, decode_header, Algorithm, DecodingKey, Validation};
use serde::Deserialize;
use serde_json::{Map, Value};
use std::collections::HashMap;
use std::path::PathBuf;
use switchyard_protocol::Identity;

/// Where a token may be taken from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TokenSource {
    /// `Authorization: Bearer <token>`
    Header,
    /// A `Sec-WebSocket-Protocol` entry `bearer.<token>` (the client must also offer
    /// `switchyard.v1`, which the server selects).
    Protocol,
    /// The query parameter named by `query_param` (default `access_token`).
    Query,
}

/// A route's `[route.auth]` table.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AuthConfig {
    /// Accepted JWT algorithms (explicit; HS* and asymmetric ones may not be mixed).
    #[serde(default)]
    pub algorithms: Vec<String>,
    /// PEM public key for RS256 / ES256 / EdDSA.
    pub key_file: Option<PathBuf>,
    /// File holding the HS256 secret.
    pub secret_file: Option<PathBuf>,
    /// JWKS file (`{"keys": [...]}`): the token's `kid` picks the key; a key's `alg`, when
    /// present, must equal the token's.
    pub jwks_file: Option<PathBuf>,
    /// Claim holding the channel patterns this client may subscribe to (e.g. `channels`).
    pub subscribe_claim: Option<String>,
    /// Claim holding the channel patterns this client may publish on.
    pub publish_claim: Option<String>,
    pub audience: Option<String>,
    pub issuer: Option<String>,
    #[serde(default = "default_sources")]
    pub token_from: Vec<TokenSource>,
    #[serde(default = "default_query")]
    pub query_param: String,
    /// Claims copied into every inbound record besides `sub` (`sy-claims`).
    #[serde(default)]
    pub stamp_claims: Vec<String>,
    /// File of static API keys, one `KEY SUBJECT` per line (`#` comments), taken from the
    /// `x-api-key` header.
    pub api_keys_file: Option<PathBuf>,
}

/// A subject is 1..=256 characters with no control characters.
fn valid_subject(s: &str) -> bool {
    !s.is_empty() && s.len() <= 256 && !s.chars().any(char::is_control)
}

fn default_sources() -> Vec<TokenSource> {
    vec![TokenSource::Header, TokenSource::Protocol, TokenSource::Query]
}
fn default_query() -> String {
    "access_token".into()
}

/// A loaded, validated verifier for one route.
pub struct Verifier {
    key: Option<DecodingKey>,
    /// JWKS keys by `kid`, with the algorithm the JWK declares.
    jwks: HashMap<String, (DecodingKey, Option<Algorithm>)>,
    subscribe_claim: Option<String>,
    publish_claim: Option<String>,
    validation: Validation,
    algorithms: Vec<Algorithm>,
    sources: Vec<TokenSource>,
    query_param: String,
    stamp: Vec<String>,
    api_keys: HashMap<String, String>,
}

/// Why a handshake was refused; `status` is what the client gets, `reason` the metric label.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Refusal {
    pub status: u16,
    pub reason: &'static str,
}

/// A verified caller.
pub struct Verified {
    pub identity: Identity,
    /// Expiry (Unix seconds), when the credential has one.
    pub expires_at: Option<u64>,
    pub grants: Grants,
}

/// Channel patterns a credential grants; `None` = the route names no claim for that operation.
/// A route that names a claim grants nothing to a token without it (or to an API key).
#[derive(Debug, Clone, Default)]
pub struct Grants {
    pub subscribe: Option<Vec<String>>,
    pub publish: Option<Vec<String>>,
}

impl Verifier {
    /// Loads keys and checks the table; the error is one line.
    pub fn load(c: &AuthConfig) -> Result<Self, String> {
        let mut algorithms = Vec::new();
        for a in &c.algorithms {
            let alg: Algorithm = a.parse().map_err(|_| format!("unknown JWT algorithm {a:?}"))?;
            if !matches!(
                alg,
                Algorithm::HS256 | Algorithm::RS256 | Algorithm::ES256 | Algorithm::EdDSA
            ) {
                return Err(format!(
                    "JWT algorithm {a} is not supported (HS256, RS256, ES256, EdDSA)"
                ));
            }
            algorithms.push(alg);
        }
        let hmac = algorithms.contains(&Algorithm::HS256);
        let asym: Vec<Algorithm> = algorithms.iter().copied().filter(|a| *a != Algorithm::HS256).collect();
        if hmac && !asym.is_empty() {
            return Err("HS256 and asymmetric algorithms in one allowlist invite key confusion: use one family".into());
        }
        let families: std::collections::HashSet<_> = asym.iter().map(|a| format!("{a:?}")).collect();
        if families.len() > 1 && c.jwks_file.is_none() {
            return Err("one key file serves one algorithm: list one of RS256, ES256, EdDSA".into());
        }
        let read = |p: &PathBuf| std::fs::read(p).map_err(|e| format!("cannot read {}: {e}", p.display()));
        let jwks = match &c.jwks_file {
            Some(p) => load_jwks(p, &algorithms)?,
            None => HashMap::new(),
        };
        let key = if !jwks.is_empty() {
            if c.key_file.is_some() || c.secret_file.is_some() {
                return Err("jwks_file replaces key_file / secret_file: give one".into());
            }
            None
        } else if hmac {
            let p = c.secret_file.as_ref().ok_or("HS256 needs secret_file")?;
            let secret = read(p)?;
            let secret = secret.trim_ascii();
            if secret.len() < 32 {
                return Err(format!("{}: HS256 secret shorter than 32 bytes", p.display()));
            }
            Some(DecodingKey::from_secret(secret))
        } else if let Some(alg) = asym.first() {
            let p = c
                .key_file
                .as_ref()
                .ok_or("RS256 / ES256 / EdDSA need key_file (PEM public key)")?;
            let pem = read(p)?;
            let k = match alg {
                Algorithm::RS256 => DecodingKey::from_rsa_pem(&pem),
                Algorithm::ES256 => DecodingKey::from_ec_pem(&pem),
                _ => DecodingKey::from_ed_pem(&pem),
            };
            Some(k.map_err(|e| format!("{}: {e}", p.display()))?)
        } else {
            None
        };
        let api_keys = match &c.api_keys_file {
            Some(p) => {
                let text = String::from_utf8(read(p)?).map_err(|_| format!("{}: not UTF-8", p.display()))?;
                let mut m = HashMap::new();
                for (n, line) in text.lines().enumerate() {
                    let line = line.trim();
                    if line.is_empty() || line.starts_with('#') {
                        continue;
                    }
                    let (k, sub) = line.split_once(char::is_whitespace).ok_or(format!(
                        "{}:{}: expected `KEY SUBJECT`",
                        p.display(),
                        n + 1
                    ))?;
                    let sub = sub.trim();
                    if !valid_subject(sub) {
                        return Err(format!("{}:{}: subject holds control characters", p.display(), n + 1));
                    }
                    m.insert(k.to_owned(), sub.to_owned());
                }
                m
            }
            None => HashMap::new(),
        };
        if key.is_none() && jwks.is_empty() && api_keys.is_empty() {
            return Err("auth needs algorithms with a key, or api_keys_file".into());
        }
        let mut validation = Validation::new(*algorithms.first().unwrap_or(&Algorithm::HS256));
        validation.algorithms = algorithms.clone();
        validation.leeway = 0;
        validation.validate_nbf = true;
        validation.set_required_spec_claims(&["exp", "sub"]);
        match &c.audience {
            Some(a) => validation.set_audience(&[a]),
            None => validation.validate_aud = false,
        }
        if let Some(i) = &c.issuer {
            validation.set_issuer(&[i]);
        }
        Ok(Self {
            key,
            jwks,
            subscribe_claim: c.subscribe_claim.clone(),
            publish_claim: c.publish_claim.clone(),
            validation,
            algorithms,
            sources: c.token_from.clone(),
            query_param: c.query_param.clone(),
            stamp: c.stamp_claims.clone(),
            api_keys,
        })
    }

    /// Verifies the handshake's credentials.
    pub fn verify(&self, headers: &axum::http::HeaderMap, query: Option<&str>) -> Result<Verified, Refusal> {
        let unauthorized = |reason| Refusal { status: 401, reason };
        if let Some(k) = headers.get("x-api-key").and_then(|v| v.to_str().ok()) {
            return match self.api_keys.get(k) {
                Some(sub) => Ok(Verified {
                    identity: Identity {
                        subject: sub.clone(),
                        claims: Map::new(),
                    },
                    expires_at: None,
                    grants: self.grants(&Map::new()),
                }),
                None => Err(unauthorized("bad_api_key")),
            };
        }
        let token = self.token(headers, query).ok_or(unauthorized("missing_token"))?;
        // Refuse anything outside the allowlist before touching the signature (alg: none,
        // HS/RS confusion).
        let header = decode_header(&token).map_err(|_| unauthorized("malformed_token"))?;
        if !self.algorithms.contains(&header.alg) {
            return Err(unauthorized("algorithm"));
        }
        let key = if self.jwks.is_empty() {
            self.key.as_ref().ok_or(unauthorized("missing_token"))?
        } else {
            let (k, alg) = header
                .kid
                .as_ref()
                .and_then(|kid| self.jwks.get(kid))
                .ok_or(unauthorized("unknown_kid"))?;
            if alg.is_some_and(|a| a != header.alg) {
                return Err(unauthorized("algorithm"));
            }
            k
        };
        let data = decode::<Map<String, Value>>(&token, key, &self.validation).map_err(|e| {
            use jsonwebtoken::errors::ErrorKind as K;
            unauthorized(match e.kind() {
                K::ExpiredSignature => "expired",
                K::ImmatureSignature => "not_yet_valid",
                K::InvalidAudience => "audience",
                K::InvalidIssuer => "issuer",
                K::InvalidSignature => "signature",
                K::MissingRequiredClaim(_) => "missing_claim",
                _ => "invalid_token",
            })
        })?;
        let claims = data.claims;
        let subject = claims
            .get("sub")
            .and_then(Value::as_str)
            .ok_or(unauthorized("missing_claim"))?
            .to_owned();
        // The subject travels in a header and in the `sy-sig` text: no control characters.
        if !valid_subject(&subject) {
            return Err(unauthorized("invalid_token"));
        }
        let mut stamped = Map::new();
        for c in &self.stamp {
            if let Some(v) = claims.get(c) {
                stamped.insert(c.clone(), v.clone());
            }
        }
        Ok(Verified {
            identity: Identity {
                subject,
                claims: stamped,
            },
            // jsonwebtoken accepts a fractional `exp` (and rounds it): so do we.
            expires_at: claims
                .get("exp")
                .and_then(|v| v.as_u64().or_else(|| v.as_f64().map(|f| f.max(0.0).round() as u64))),
            grants: self.grants(&claims),
        })
    }

    /// The channel patterns the token's configured claims hold (strings or arrays of strings).
    fn grants(&self, claims: &Map<String, Value>) -> Grants {
        let list = |name: &Option<String>| {
            name.as_ref().map(|n| match claims.get(n) {
                Some(Value::String(s)) => vec![s.clone()],
                Some(Value::Array(a)) => a.iter().filter_map(|v| v.as_str().map(str::to_owned)).collect(),
                _ => Vec::new(),
            })
        };
        Grants {
            subscribe: list(&self.subscribe_claim),
            publish: list(&self.publish_claim),
        }
    }

    fn token(&self, headers: &axum::http::HeaderMap, query: Option<&str>) -> Option<String> {
        for s in &self.sources {
            let t = match s {
                TokenSource::Header => headers
                    .get("authorization")
                    .and_then(|v| v.to_str().ok())
                    .and_then(|v| v.strip_prefix("Bearer ").or_else(|| v.strip_prefix("bearer ")))
                    .map(str::to_owned),
                TokenSource::Protocol => headers
                    .get_all("sec-websocket-protocol")
                    .iter()
                    .filter_map(|v| v.to_str().ok())
                    .flat_map(|v| v.split(','))
                    .find_map(|p| p.trim().strip_prefix("bearer.").map(str::to_owned)),
                TokenSource::Query => query.and_then(|q| {
                    q.split('&')
                        .find_map(|kv| kv.strip_prefix(&self.query_param)?.strip_prefix('=').map(str::to_owned))
                }),
            };
            if t.is_some() {
                return t;
            }
        }
        None
    }
}

/// Reads a JWKS file: every key needs a `kid`; a key's declared `alg` must be in the allowlist.
fn load_jwks(
    p: &std::path::Path,
    allowed: &[Algorithm],
) -> Result<HashMap<String, (DecodingKey, Option<Algorithm>)>, String> {
    let text = std::fs::read(p).map_err(|e| format!("cannot read {}: {e}", p.display()))?;
    let set: jsonwebtoken::jwk::JwkSet =
        serde_json::from_slice(&text).map_err(|e| format!("{}: not a JWKS: {e}", p.display()))?;
    let mut keys = HashMap::new();
    for (i, jwk) in set.keys.iter().enumerate() {
        let kid = jwk
            .common
            .key_id
            .clone()
            .ok_or_else(|| format!("{}: key {i} has no kid", p.display()))?;
        let alg = match jwk.common.key_algorithm {
            Some(a) => {
                let a: Algorithm = a
                    .to_string()
                    .parse()
                    .map_err(|_| format!("{}: key {kid:?}: algorithm {a} is not usable", p.display()))?;
                if !allowed.contains(&a) {
                    return Err(format!(
                        "{}: key {kid:?} is for {a:?}, not in the allowlist",
                        p.display()
                    ));
                }
                Some(a)
            }
            None => None,
        };
        let key = DecodingKey::from_jwk(jwk).map_err(|e| format!("{}: key {kid:?}: {e}", p.display()))?;
        keys.insert(kid, (key, alg));
    }
    if keys.is_empty() {
        return Err(format!("{}: no keys", p.display()));
    }
    Ok(keys)
}

#[cfg(test)]
mod tests {
    use super::valid_subject;

    #[test]
    fn subjects_hold_no_control_characters() {
        assert!(valid_subject("alice") && valid_subject("user@example.com") && valid_subject("ü"));
        for bad in ["", "a\nsy-claims=x", "tab\there", "nul\0", &"x".repeat(257)] {
            assert!(!valid_subject(bad), "{bad:?}");
        }
    }
}
