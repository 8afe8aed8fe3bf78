//! Topic / subject names. Every bus uses the same dotted names; NATS uses them as subjects,
//! Kafka and memory as topic names. `prefix` (default `sy`) lets several deployments share a bus.

/// Names derived from one prefix.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Naming {
    prefix: String,
}

impl Default for Naming {
    fn default() -> Self {
        Self { prefix: "sy".into() }
    }
}

impl Naming {
    /// `prefix` must itself be a valid dotted name (see [`valid_channel`]).
    pub fn new(prefix: &str) -> Result<Self, String> {
        if !valid_channel(prefix) {
            return Err(format!(
                "invalid prefix {prefix:?}: use dot-separated tokens of [A-Za-z0-9_-]"
            ));
        }
        Ok(Self {
            prefix: prefix.to_owned(),
        })
    }
    pub fn prefix(&self) -> &str {
        &self.prefix
    }
    /// Client frames and lifecycle events of a route: `<prefix>.in.<topic>`.
    pub fn inbound(&self, topic: &str) -> String {
        format!("{}.in.{topic}", self.prefix)
    }
    /// One partition of a route's inbound stream (NATS): `<prefix>.in.<topic>.p<N>`.
    pub fn inbound_partition(&self, topic: &str, partition: u32) -> String {
        format!("{}.in.{topic}.p{partition}", self.prefix)
    }
    /// Backend replies and control records, keyed by session: `<prefix>.out`.
    pub fn outbound(&self) -> String {
        format!("{}.out", self.prefix)
    }
    /// Session lifecycle feed the routers build their registry from: `<prefix>.sessions`.
    pub fn sessions(&self) -> String {
        format!("{}.sessions", self.prefix)
    }
    /// Delivery subject of one edge node: `<prefix>.node.<node>`.
    pub fn node(&self, node: &str) -> String {
        format!("{}.node.{node}", self.prefix)
    }
    /// A channel: `<prefix>.ch.<channel>`.
    pub fn channel(&self, channel: &str) -> String {
        format!("{}.ch.{channel}", self.prefix)
    }
    /// The JetStream stream over every inbound subject (NATS): `<PREFIX>_IN`, dots as `_`.
    pub fn inbound_stream(&self) -> String {
        format!("{}_IN", self.undotted().to_uppercase())
    }
    /// The JetStream work-queue stream over the outbound subject (NATS): `<PREFIX>_OUT`.
    pub fn outbound_stream(&self) -> String {
        format!("{}_OUT", self.undotted().to_uppercase())
    }
    /// The JetStream stream over every node delivery subject (NATS): `<PREFIX>_NODES`.
    pub fn node_stream(&self) -> String {
        format!("{}_NODES", self.undotted().to_uppercase())
    }
    /// The compacted topic holding each Kafka channel topic's history epoch: `<prefix>.epochs`.
    pub fn epochs(&self) -> String {
        format!("{}.epochs", self.prefix)
    }
    /// The JetStream stream keeping the history of one channel pattern (NATS):
    /// `<PREFIX>_CH_<murmur2 of the pattern, hex>` (stream names may not hold `.`, `*`, `>`).
    pub fn history_stream(&self, pattern: &str) -> String {
        format!(
            "{}_CH_{:08X}",
            self.undotted().to_uppercase(),
            murmur2(pattern.as_bytes())
        )
    }
    /// The JetStream KV bucket of the durable session registry (NATS): `<prefix>_sessions`.
    pub fn registry_bucket(&self) -> String {
        format!("{}_sessions", self.undotted())
    }
    /// The prefix with its dots as `_` (stream and bucket names may not contain dots).
    fn undotted(&self) -> String {
        self.prefix.replace('.', "_")
    }
    /// The channel name of a channel topic, if `topic` is one.
    pub fn channel_of<'a>(&self, topic: &'a str) -> Option<&'a str> {
        self.rest(topic).and_then(|t| t.strip_prefix("ch."))
    }
    /// The route topic of an inbound topic (`<prefix>.in.<topic>` → `<topic>`).
    pub fn inbound_of<'a>(&self, topic: &'a str) -> Option<&'a str> {
        self.rest(topic).and_then(|t| t.strip_prefix("in."))
    }
    /// What `topic` is, judged after this prefix (which may itself contain dots). Used for
    /// bounded metric labels and per-kind topic settings (partitions, compaction).
    pub fn classify(&self, topic: &str) -> TopicClass {
        let Some(rest) = self.rest(topic) else {
            return TopicClass::Other;
        };
        match rest.split_once('.') {
            None if rest == "out" => TopicClass::Outbound,
            None if rest == "sessions" => TopicClass::Sessions,
            Some(("in", t)) if !t.is_empty() => TopicClass::Inbound,
            Some(("node", n)) if !n.is_empty() => TopicClass::Node,
            Some(("ch", c)) if !c.is_empty() => TopicClass::Channel,
            _ => TopicClass::Other,
        }
    }
    /// `topic` after `<prefix>.`, if it starts with it.
    fn rest<'a>(&self, topic: &'a str) -> Option<&'a str> {
        topic.strip_prefix(self.prefix.as_str())?.strip_prefix('.')
    }
}

/// The kind of a topic under one prefix (see [`Naming::classify`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TopicClass {
    /// `<prefix>.in.<topic>` (and NATS partition subjects below it).
    Inbound,
    /// `<prefix>.out`.
    Outbound,
    /// `<prefix>.sessions`.
    Sessions,
    /// `<prefix>.node.<node>`.
    Node,
    /// `<prefix>.ch.<channel>`.
    Channel,
    /// Anything else (another prefix, a staging topic of `replay --to-topic`).
    Other,
}

impl TopicClass {
    /// A bounded metric label: `in`, `out`, `sessions`, `node`, `ch` or `other`.
    pub fn label(self) -> &'static str {
        match self {
            TopicClass::Inbound => "in",
            TopicClass::Outbound => "out",
            TopicClass::Sessions => "sessions",
            TopicClass::Node => "node",
            TopicClass::Channel => "ch",
            TopicClass::Other => "other",
        }
    }
}

/// Longest channel (or topic) name accepted.
pub const MAX_NAME_LEN: usize = 200;

/// A channel or topic name: 1..=200 chars, dot-separated non-empty tokens of `[A-Za-z0-9_-]`.
/// No wildcards, no spaces, no empty tokens.
pub fn valid_channel(s: &str) -> bool {
    s.len() <= MAX_NAME_LEN && valid_dotted(s, false)
}

/// A channel pattern: like [`valid_channel`], but a token may be `*` (any one token) and the
/// last token may be `>` (one or more tokens).
pub fn valid_pattern(s: &str) -> bool {
    s.len() <= MAX_NAME_LEN && valid_dotted(s, true)
}

/// Dot-separated non-empty tokens of `[A-Za-z0-9_-]`, of any length (a bus topic is a prefix
/// plus a name). With `wildcards`, a token may be `*` and the last one `>`.
pub fn valid_dotted(s: &str, wildcards: bool) -> bool {
    let mut tokens = s.split('.').peekable();
    !s.is_empty()
        && std::iter::from_fn(|| tokens.next().map(|t| (t, tokens.peek().is_none()))).all(|(t, last)| {
            (wildcards && (t == "*" || (t == ">" && last)))
                || (!t.is_empty() && t.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-'))
        })
}

/// Does `name` match the NATS-style `pattern` (`*` = one token, `>` = one or more trailing
/// tokens)? The one matcher behind channel grants and the memory bus.
pub fn pattern_matches(pattern: &str, name: &str) -> bool {
    let mut p = pattern.split('.');
    let mut t = name.split('.');
    loop {
        match (p.next(), t.next()) {
            (Some(">"), Some(_)) => return true,
            (Some("*"), Some(_)) => {}
            (Some(a), Some(b)) if a == b => {}
            (None, None) => return true,
            _ => return false,
        }
    }
}

/// True when some name matches both patterns (two history patterns that overlap would give
/// one channel two logs).
pub fn patterns_overlap(a: &str, b: &str) -> bool {
    let mut x = a.split('.');
    let mut y = b.split('.');
    loop {
        match (x.next(), y.next()) {
            (Some(">"), Some(_)) | (Some(_), Some(">")) => return true,
            (Some("*"), Some(_)) | (Some(_), Some("*")) => {}
            (Some(p), Some(q)) if p == q => {}
            (None, None) => return true,
            _ => return false,
        }
    }
}

/// Kafka's default partitioner hash (murmur2, seed 0x9747b28c), so that Java clients, the
/// NATS partition token and `replay` agree on key → partition.
pub fn murmur2(data: &[u8]) -> u32 {
    const M: u32 = 0x5bd1_e995;
    const R: u32 = 24;
    let len = data.len();
    let mut h: u32 = 0x9747_b28c ^ (len as u32);
    let mut chunks = data.chunks_exact(4);
    for c in &mut chunks {
        let mut k = u32::from_le_bytes([c[0], c[1], c[2], c[3]]);
        k = k.wrapping_mul(M);
        k ^= k >> R;
        k = k.wrapping_mul(M);
        h = h.wrapping_mul(M);
        h ^= k;
    }
    let rest = chunks.remainder();
    if rest.len() >= 3 {
        h ^= (rest[2] as u32) << 16;
    }
    if rest.len() >= 2 {
        h ^= (rest[1] as u32) << 8;
    }
    if !rest.is_empty() {
        h ^= rest[0] as u32;
        h = h.wrapping_mul(M);
    }
    h ^= h >> 13;
    h = h.wrapping_mul(M);
    h ^= h >> 15;
    h
}

/// Partition of `key` among `partitions`, exactly as Kafka's default partitioner computes it.
pub fn partition_for(key: &[u8], partitions: u32) -> u32 {
    (murmur2(key) & 0x7fff_ffff) % partitions.max(1)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names() {
        let n = Naming::default();
        assert_eq!(n.inbound("echo"), "sy.in.echo");
        assert_eq!(n.inbound_partition("echo", 3), "sy.in.echo.p3");
        assert_eq!(n.node("a1"), "sy.node.a1");
        assert_eq!(n.channel("ticker.AAPL"), "sy.ch.ticker.AAPL");
        assert_eq!(n.channel_of("sy.ch.ticker.AAPL"), Some("ticker.AAPL"));
        assert_eq!(n.channel_of("sy.out"), None);
        assert!(Naming::new("a b").is_err());
    }

    #[test]
    fn overlapping_patterns() {
        for (a, b, want) in [
            ("ticker.*", "ticker.AAPL", true),
            ("ticker.*", "ticker.>", true),
            ("ticker.*", "dash.*", false),
            ("a.*.c", "a.b.*", true),
            ("a.*", "a.b.c", false),
            ("a.>", "a", false),
            ("x", "x", true),
            ("*.b", "a.*", true),
        ] {
            assert_eq!(patterns_overlap(a, b), want, "{a} / {b}");
            assert_eq!(patterns_overlap(b, a), want, "{b} / {a}");
        }
    }

    #[test]
    fn classify_with_a_dotted_prefix() {
        let n = Naming::new("acme.prod").unwrap();
        assert_eq!(n.classify(&n.inbound("echo")), TopicClass::Inbound);
        assert_eq!(n.classify(&n.inbound_partition("echo", 3)), TopicClass::Inbound);
        assert_eq!(n.classify(&n.outbound()), TopicClass::Outbound);
        assert_eq!(n.classify(&n.sessions()), TopicClass::Sessions);
        assert_eq!(n.classify(&n.node("e1")), TopicClass::Node);
        assert_eq!(n.classify(&n.channel("ticker.AAPL")), TopicClass::Channel);
        assert_eq!(n.channel_of(&n.channel("ticker.AAPL")), Some("ticker.AAPL"));
        assert_eq!(n.inbound_of(&n.inbound("chat.room")), Some("chat.room"));
        assert_eq!(n.inbound_stream(), "ACME_PROD_IN");
        assert_eq!(n.registry_bucket(), "acme_prod_sessions");
        // Another deployment's names, or one that only shares the prefix's first characters.
        for other in [
            "sy.in.echo",
            "acme.production.in.echo",
            "acme.prod",
            "acme.prod.in",
            "acme.prod.outx",
        ] {
            assert_eq!(n.classify(other), TopicClass::Other, "{other}");
        }
        assert_eq!(TopicClass::Inbound.label(), "in");
    }

    #[test]
    fn channel_validation() {
        for ok in ["a", "ticker.AAPL", "dash_ops-1.x"] {
            assert!(valid_channel(ok), "{ok}");
        }
        for bad in ["", ".", "a..b", "a.", "*", "a.>", "a b", &"x".repeat(201)] {
            assert!(!valid_channel(bad), "{bad}");
        }
    }

    #[test]
    fn patterns() {
        assert!(pattern_matches("a.b", "a.b"));
        assert!(pattern_matches("a.*", "a.b"));
        assert!(!pattern_matches("a.*", "a.b.c"));
        assert!(pattern_matches("a.>", "a.b.c"));
        assert!(!pattern_matches("a.>", "a"));
        assert!(!pattern_matches("a.b", "a.c"));
        assert!(!pattern_matches("a.b", "a.b.c"));
        for ok in ["a.*.>", "*", ">", "ticker.*", "room.>"] {
            assert!(valid_pattern(ok), "{ok}");
        }
        for bad in ["", "a..b", "a.>.b", "a*", "a.b c", &"x".repeat(201)] {
            assert!(!valid_pattern(bad), "{bad}");
        }
        assert!(!valid_dotted("a.*", false));
        assert!(valid_dotted(&format!("sy.ch.{}", "x".repeat(200)), false));
    }

    #[test]
    fn murmur2_matches_kafka() {
        // Values from Kafka's UtilsTest.testMurmur2.
        assert_eq!(murmur2(b"21") as i32, -973932308);
        assert_eq!(murmur2(b"foobar") as i32, -790332482);
        assert_eq!(murmur2(b"a-little-bit-long-string") as i32, -985981536);
        assert_eq!(murmur2(b"a-little-bit-longer-string") as i32, -1486304829);
        assert_eq!(
            murmur2(b"lkjh234lh9fiuh90y23oiuhsafujhadof229phr9h19h89h8") as i32,
            -58897971
        );
        assert_eq!(murmur2(b"abc") as i32, 479470107);
    }
}
