use super::*;
use proptest::prelude::*;

/// A masked client frame (first byte `b0`: FIN, RSV and opcode bits) with this mask.
pub(crate) fn frame_with(b0: u8, payload: &[u8], mask: [u8; 4]) -> Vec<u8> {
    encode_client_frame(b0, payload, mask)
}

/// A masked client frame (first byte `b0`: FIN, RSV and opcode bits).
pub(crate) fn frame(b0: u8, payload: &[u8]) -> Vec<u8> {
    frame_with(b0, payload, [0x37, 0xfa, 0x21, 0x3d])
}

/// Everything `wire` gives when fed in chunks of the given sizes (cycled), each chunk drained
/// before the next is fed, ending with the error if there is one; and the charges made.
fn parse_split(wire: &[u8], chunks: &[usize], max: usize) -> (Vec<Result<Msg, Error>>, Vec<FrameKind>) {
    let mut p = Parser::new(max);
    let mut charged = Vec::new();
    let mut budget = |k| {
        charged.push(k);
        Ok(())
    };
    let mut out = Vec::new();
    let mut rest = wire;
    let mut sizes = chunks.iter().cycle();
    'outer: while !rest.is_empty() {
        let n = (*sizes.next().unwrap()).clamp(1, rest.len());
        let (chunk, tail) = rest.split_at(n);
        rest = tail;
        let mut r = p.feed(chunk, &mut budget);
        loop {
            match r {
                Ok(Some(m)) => out.push(Ok(m)),
                Ok(None) => break,
                Err(e) => {
                    out.push(Err(e));
                    break 'outer;
                }
            }
            r = p.next(&mut budget);
        }
    }
    (out, charged)
}

fn parse(wire: &[u8], chunk: usize, max: usize) -> Vec<Result<Msg, Error>> {
    parse_split(wire, &[chunk], max).0
}

#[test]
fn messages_fragments_and_controls_in_any_split() {
    let mut wire = frame(0x81, b"hello");
    wire.extend(frame(0x02, b"ab")); // binary, not final
    wire.extend(frame(0x89, b"p")); // ping between fragments
    wire.extend(frame(0x00, b"cd"));
    wire.extend(frame(0x80, b"ef")); // final continuation
    wire.extend(frame(0x82, &vec![9u8; 70_000]));
    wire.extend(frame(0x8a, b""));
    wire.extend(frame(0x88, &[0x03, 0xe8, b'b', b'y', b'e']));
    for chunk in [1, 3, 7, 4096, wire.len()] {
        let (got, charged) = parse_split(&wire, &[chunk], 1 << 20);
        assert_eq!(
            got,
            vec![
                Ok(Msg::Text(Bytes::from_static(b"hello"))),
                Ok(Msg::Ping(Bytes::from_static(b"p"))),
                Ok(Msg::Binary(Bytes::from_static(b"abcdef"))),
                Ok(Msg::Binary(Bytes::from(vec![9u8; 70_000]))),
                Ok(Msg::Pong),
                Ok(Msg::Close(Some((1000, "bye".into())))),
            ],
            "chunk {chunk}"
        );
        use FrameKind::*;
        assert_eq!(
            charged,
            [Data, Data, Control, Continuation, Continuation, Data, Control, Control],
            "chunk {chunk}"
        );
    }
}

#[test]
fn violations_get_their_errors() {
    let cases: Vec<(Vec<u8>, &str)> = vec![
        (vec![0x81, 0x01, b'x'], "protocol error: client frame not masked"),
        (
            frame(0xc1, b"x"),
            "protocol error: reserved bits set without an extension",
        ),
        (frame(0x83, b"x"), "protocol error: reserved opcode"),
        (frame(0x8b, b"x"), "protocol error: reserved opcode"),
        (frame(0x09, b"x"), "protocol error: fragmented control frame"),
        (frame(0x89, &[0u8; 126]), "protocol error: control frame over 125 bytes"),
        (
            frame(0x80, b"x"),
            "protocol error: continuation outside a fragmented message",
        ),
        (
            [frame(0x01, b"a"), frame(0x81, b"b")].concat(),
            "protocol error: new message inside a fragmented message",
        ),
        (frame(0x88, &[3]), "protocol error: close payload of one byte"),
        (
            frame(0x88, &1005u16.to_be_bytes()),
            "protocol error: close code not allowed",
        ),
        (frame(0x81, &[0xff, 0xfe]), "invalid UTF-8 in text frame"),
        // Fails at the first fragment, without waiting for the message to end.
        (frame(0x01, &[b'a', 0xff]), "invalid UTF-8 in text frame"),
        // A character cut between fragments is fine; one never finished is not.
        ([frame(0x01, &[0xc3]), frame(0x80, &[0xa9])].concat(), "none"),
        (
            [frame(0x01, b"a"), frame(0x80, &[0xc3])].concat(),
            "invalid UTF-8 in text frame",
        ),
        (frame(0x88, &[0x03, 0xe8, 0xff]), "invalid UTF-8 in text frame"),
        (frame(0x82, &[0u8; 101]), "frame too big"),
        // The message limit applies from the continuation's header.
        (
            [frame(0x02, &[0u8; 60]), frame(0x80, &[0u8; 60])[..8].to_vec()].concat(),
            "message too big",
        ),
        (
            [
                vec![0x82, 0xff],
                (1u64 << 63 | 5).to_be_bytes().to_vec(),
                vec![1, 2, 3, 4],
            ]
            .concat(),
            "protocol error: frame length with the most significant bit set",
        ),
        (
            [frame(0x02, &[0u8; 60]), frame(0x80, &[0u8; 60])].concat(),
            "message too big",
        ),
    ];
    for (wire, want) in cases {
        for chunk in [1, 5, wire.len()] {
            let got = parse(&wire, chunk, 100);
            let last = got.last().and_then(|r| r.clone().err()).map(|e| e.to_string());
            assert_eq!(
                last.as_deref().unwrap_or("none"),
                want,
                "{wire:x?} in chunks of {chunk}"
            );
        }
    }
}

#[test]
fn close_codes_are_owed_per_error() {
    assert_eq!(Error::Protocol("x").close(), (1002, "protocol error"));
    assert_eq!(Error::Utf8.close().0, 1007);
    assert_eq!(Error::FrameTooBig.close(), (1009, "frame too big"));
    assert_eq!(Error::MessageTooBig.close(), (1009, "message too big"));
    assert_eq!(Error::Flood(Flood::Frames).close(), (1008, "frame flood"));
    assert_eq!(Error::Flood(Flood::Control).close(), (1008, "control frame flood"));
    assert_eq!(Error::Flood(Flood::Control).to_string(), "control frame flood");
    assert_eq!(
        (Flood::Frames.label(), Flood::Control.label()),
        ("frame_flood", "control_flood")
    );
}

#[test]
fn allowed_close_codes() {
    let allowed: Vec<u16> = (0..=u16::MAX).filter(|c| close_code_allowed(*c)).collect();
    let mut want: Vec<u16> = vec![1000, 1001, 1002, 1003, 1007, 1008, 1009, 1010, 1011, 1012, 1013];
    want.extend(3000..=4999);
    assert_eq!(allowed, want);
}

#[test]
fn no_buffer_is_kept_between_frames() {
    let mut p = Parser::new(100);
    let got = p.feed(&frame(0x81, b"hi"), &mut Unlimited).unwrap().unwrap();
    assert_eq!(got, Msg::Text(Bytes::from_static(b"hi")));
    assert!(p.is_idle());
    assert_eq!((p.buffered(), p.capacity()), (0, 0));

    // Two frames in one read: the second waits in the parser, then it is released.
    let wire = [frame(0x81, b"a"), frame(0x82, b"b")].concat();
    assert_eq!(
        p.feed(&wire, &mut Unlimited).unwrap(),
        Some(Msg::Text(Bytes::from_static(b"a")))
    );
    assert!(!p.is_idle());
    assert_eq!(
        p.next(&mut Unlimited).unwrap(),
        Some(Msg::Binary(Bytes::from_static(b"b")))
    );
    assert_eq!((p.buffered(), p.capacity()), (0, 0));
    assert_eq!(p.next(&mut Unlimited).unwrap(), None);

    // A large frame arriving in pieces: memory grows with what arrived (what a header claims
    // reserves at most 64 KiB ahead; growth is amortised, so at most twice that plus what
    // arrived), and is released once the frame is complete.
    let mut p = Parser::new(2 << 20);
    let big = frame(0x82, &vec![7u8; 1 << 20]);
    for c in big.chunks(4096) {
        if let Some(m) = p.feed(c, &mut Unlimited).unwrap() {
            assert_eq!(m, Msg::Binary(Bytes::from(vec![7u8; 1 << 20])));
        }
        let bound = 2 * (p.buffered() + RESERVE_MAX + 4096);
        assert!(
            p.capacity() <= bound,
            "{} held for {} arrived",
            p.capacity(),
            p.buffered()
        );
    }
    assert_eq!((p.buffered(), p.capacity()), (0, 0));

    // Found by the ws_parser fuzz target: a header ending one read reserves room for its
    // payload; when the payload then arrives whole in the next read it is parsed from that
    // read, and the reservation must not stay behind on an idle socket.
    let mut p = Parser::new(100);
    let f = frame(0x82, b"ab");
    assert_eq!(p.feed(&f[..6], &mut Unlimited).unwrap(), None);
    assert!(p.capacity() >= 2);
    assert_eq!(
        p.feed(&f[6..], &mut Unlimited).unwrap(),
        Some(Msg::Binary(Bytes::from_static(b"ab")))
    );
    assert!(p.is_idle());
    assert_eq!(p.capacity(), 0, "reservation kept while idle");
    // The same when the frame only continues a message.
    let wire = [frame(0x02, b"a"), frame(0x80, b"b")].concat();
    let cut = wire.len() - 1;
    assert_eq!(p.feed(&wire[..cut], &mut Unlimited).unwrap(), None);
    assert_eq!(
        p.feed(&wire[cut..], &mut Unlimited).unwrap(),
        Some(Msg::Binary(Bytes::from_static(b"ab")))
    );
    assert_eq!(p.capacity(), 0, "reservation kept while idle");
    let wire = [frame(0x01, b"a"), frame(0x00, b"b")].concat();
    let cut = wire.len() - 1;
    assert_eq!(p.feed(&wire[..cut], &mut Unlimited).unwrap(), None);
    assert_eq!(p.feed(&wire[cut..], &mut Unlimited).unwrap(), None);
    assert_eq!(p.buffered(), 2);
    assert!(
        p.capacity() <= 8,
        "only the unfinished message is kept (a Vec holds 8 bytes at least)"
    );

    // Found by the ws_parser fuzz target: after a large frame, the few bytes of the next one
    // that arrived with it must not keep (and later grow back into) the large frame's
    // allocation once the message is dropped: memory stays what is held plus 64 KiB ahead.
    for (first, second) in [(0x82, 0x82), (0x02, 0x80)] {
        let mut p = Parser::new(1 << 20);
        let wire = [
            frame(0x82, &[0u8; 120]),
            frame(first, &vec![1u8; 87_377]),
            frame(second, &vec![2u8; 64_250]),
        ]
        .concat();
        for (i, c) in wire.chunks(74).enumerate() {
            let mut r = p.feed(c, &mut Unlimited).unwrap();
            while let Some(m) = r {
                drop(m); // as the bus does once it has the message
                r = p.next(&mut Unlimited).unwrap();
            }
            let bound = 2 * (p.buffered() + RESERVE_MAX + 74);
            assert!(
                p.capacity() <= bound,
                "chunk {i}: {} held for {}",
                p.capacity(),
                p.buffered()
            );
        }
        assert_eq!(p.capacity(), 0);
    }

    // A header claiming a huge frame reserves nothing beyond the limit check.
    let mut p = Parser::new(usize::MAX >> 1);
    let mut huge = vec![0x82, 0xff];
    huge.extend((1u64 << 40).to_be_bytes());
    huge.extend([1, 2, 3, 4]);
    assert_eq!(p.feed(&huge, &mut Unlimited).unwrap(), None);
    assert!(p.capacity() <= RESERVE_MAX, "reserved {}", p.capacity());
}

#[test]
fn need_more_is_not_an_error_and_stays_need_more() {
    let f = frame(0x81, b"hello");
    for cut in 0..f.len() {
        let mut p = Parser::new(100);
        assert_eq!(p.feed(&f[..cut], &mut Unlimited), Ok(None), "cut at {cut}");
        assert_eq!(p.next(&mut Unlimited), Ok(None));
        assert_eq!(p.feed(&[], &mut Unlimited), Ok(None));
        assert_eq!(p.is_idle(), cut == 0);
        assert_eq!(
            p.feed(&f[cut..], &mut Unlimited),
            Ok(Some(Msg::Text(Bytes::from_static(b"hello"))))
        );
    }
}

#[test]
fn an_error_is_final() {
    let mut p = Parser::new(100);
    let wire = [frame(0x83, b""), frame(0x81, b"x")].concat();
    let e = Error::Protocol("reserved opcode");
    assert_eq!(p.feed(&wire, &mut Unlimited), Err(e));
    assert_eq!(p.next(&mut Unlimited), Err(e));
    assert_eq!(p.feed(&frame(0x81, b"x"), &mut Unlimited), Err(e));
    assert_eq!(p.error(), Some(e));
    assert_eq!(p.capacity(), 0, "buffers released");
}

/// A budget of `frames` frame headers and `control` control headers, counting its charges.
struct Counted {
    frames: usize,
    control: usize,
    charges: usize,
}

impl Budget for Counted {
    fn charge(&mut self, kind: FrameKind) -> Result<(), Flood> {
        self.charges += 1;
        if self.frames == 0 {
            return Err(Flood::Frames);
        }
        self.frames -= 1;
        if kind == FrameKind::Control {
            if self.control == 0 {
                return Err(Flood::Control);
            }
            self.control -= 1;
        }
        Ok(())
    }
}

#[test]
fn headers_are_charged_once_when_complete_and_floods_stop_parsing() {
    // Charged when the header is complete, before the payload, once however it is split.
    let f = frame(0x82, &[1u8; 300]);
    let mut p = Parser::new(1000);
    let mut b = Counted {
        frames: 10,
        control: 10,
        charges: 0,
    };
    for (i, byte) in f.iter().enumerate() {
        let r = p.feed(&[*byte], &mut b).unwrap();
        // 2 bytes, a 16-bit length, a mask: complete at the 8th byte.
        assert_eq!(b.charges, usize::from(i >= 7), "after byte {i}");
        assert_eq!(r.is_some(), i == f.len() - 1);
    }

    // 10^4 empty continuations, a budget of 100 frames: the 101st header trips it, and nothing
    // after it is parsed.
    let mut wire = frame(0x01, b"x");
    for _ in 0..10_000 {
        wire.extend(frame(0x00, b""));
    }
    wire.extend(frame(0x80, b"y"));
    let mut p = Parser::new(1000);
    let mut b = Counted {
        frames: 100,
        control: 10,
        charges: 0,
    };
    assert_eq!(p.feed(&wire, &mut b), Err(Error::Flood(Flood::Frames)));
    assert_eq!(b.charges, 101);
    assert_eq!(p.next(&mut b), Err(Error::Flood(Flood::Frames)));
    assert_eq!(b.charges, 101, "nothing charged after the trip");

    // Pings: the control budget trips first; the pings before it come out.
    let wire: Vec<u8> = (0..20).flat_map(|_| frame(0x89, b"")).collect();
    let (got, _) = parse_split(&wire, &[7], 1000);
    assert_eq!(got.len(), 20);
    let mut p = Parser::new(1000);
    let mut b = Counted {
        frames: 100,
        control: 10,
        charges: 0,
    };
    let mut pings = 0;
    let mut r = p.feed(&wire, &mut b);
    while let Ok(Some(Msg::Ping(_))) = r {
        pings += 1;
        r = p.next(&mut b);
    }
    assert_eq!((pings, r), (10, Err(Error::Flood(Flood::Control))));

    // A flood is reported before what is wrong with the same frame.
    let mut p = Parser::new(1000);
    let mut none = |_| Err(Flood::Frames);
    assert_eq!(p.feed(&frame(0x83, b""), &mut none), Err(Error::Flood(Flood::Frames)));
}

/// A message as a reference encoder sends it: fragment sizes, masks, control frames between
/// fragments.
#[derive(Debug, Clone)]
enum Send {
    Data {
        text: bool,
        payload: Vec<u8>,
        cuts: Vec<usize>,
    },
    Ping(Vec<u8>),
    Pong(Vec<u8>),
}

fn arb_send() -> impl Strategy<Value = Send> {
    prop_oneof![
        4 => (any::<bool>(), proptest::collection::vec(any::<u8>(), 0..600), proptest::collection::vec(0usize..600, 0..4))
            .prop_map(|(text, payload, cuts)| {
                let payload = if text { String::from_utf8_lossy(&payload).into_owned().into_bytes() } else { payload };
                Send::Data { text, payload, cuts }
            }),
        1 => proptest::collection::vec(any::<u8>(), 0..=125).prop_map(Send::Ping),
        1 => proptest::collection::vec(any::<u8>(), 0..=125).prop_map(Send::Pong),
    ]
}

/// The reference encoder: the wire bytes for `sends` (masks from `masks`, cycled) and the
/// messages a server must see.
fn encode(sends: &[Send], masks: &[[u8; 4]]) -> (Vec<u8>, Vec<Msg>) {
    let mut masks = masks.iter().cycle();
    let mut wire = Vec::new();
    let mut want = Vec::new();
    for s in sends {
        match s {
            Send::Data { text, payload, cuts } => {
                let mut cuts: Vec<usize> = cuts.iter().map(|c| c % (payload.len() + 1)).collect();
                cuts.sort_unstable();
                let mut bounds = vec![0];
                bounds.extend(cuts);
                bounds.push(payload.len());
                let n = bounds.len() - 1;
                for i in 0..n {
                    let op = if i == 0 { u8::from(!*text) + 1 } else { 0 };
                    let fin = if i == n - 1 { 0x80 } else { 0 };
                    wire.extend(frame_with(
                        fin | op,
                        &payload[bounds[i]..bounds[i + 1]],
                        *masks.next().unwrap(),
                    ));
                    if i == 0 && n > 1 {
                        // A ping between the first two fragments.
                        wire.extend(frame_with(0x89, b"between", *masks.next().unwrap()));
                        want.push(Msg::Ping(Bytes::from_static(b"between")));
                    }
                }
                let data = Bytes::from(payload.clone());
                want.push(if *text { Msg::Text(data) } else { Msg::Binary(data) });
            }
            Send::Ping(p) => {
                wire.extend(frame_with(0x89, p, *masks.next().unwrap()));
                want.push(Msg::Ping(Bytes::from(p.clone())));
            }
            Send::Pong(p) => {
                wire.extend(frame_with(0x8a, p, *masks.next().unwrap()));
                want.push(Msg::Pong);
            }
        }
    }
    (wire, want)
}

proptest! {
    #[test]
    fn round_trip_with_a_reference_encoder_in_any_split(
        sends in proptest::collection::vec(arb_send(), 0..12),
        masks in proptest::collection::vec(any::<[u8; 4]>(), 1..4),
        chunks in proptest::collection::vec(1usize..300, 1..6),
        close in proptest::option::of((1000u16..=1003, "[a-z ]{0,20}")),
    ) {
        let (mut wire, mut want) = encode(&sends, &masks);
        if let Some((code, reason)) = &close {
            let mut p = code.to_be_bytes().to_vec();
            p.extend(reason.as_bytes());
            wire.extend(frame_with(0x88, &p, masks[0]));
            want.push(Msg::Close(Some((*code, reason.clone()))));
        }
        let (got, charged) = parse_split(&wire, &chunks, 1 << 20);
        let got: Vec<Msg> = got.into_iter().map(|r| r.expect("no error")).collect();
        prop_assert_eq!(got, want);
        // One charge per frame header (as many as the wire has frames).
        let mut frames = 0;
        let mut rest = &wire[..];
        while let Some((_, len, _, n)) = read_head(rest) {
            rest = &rest[n + len as usize..];
            frames += 1;
        }
        prop_assert_eq!(charged.len(), frames);
    }

    #[test]
    fn any_bytes_give_the_same_result_in_any_split(
        wire in proptest::collection::vec(any::<u8>(), 0..400),
        chunks in proptest::collection::vec(1usize..50, 1..6),
        max in 0usize..300,
    ) {
        let whole = parse_split(&wire, &[wire.len().max(1)], max);
        let split = parse_split(&wire, &chunks, max);
        prop_assert_eq!(whole, split);
    }

    #[test]
    fn garbage_after_a_valid_prefix_never_panics(
        prefix in proptest::collection::vec(arb_send(), 0..3),
        tail in proptest::collection::vec(any::<u8>(), 0..200),
        chunks in proptest::collection::vec(1usize..50, 1..4),
    ) {
        let (mut wire, want) = encode(&prefix, &[[1, 2, 3, 4]]);
        wire.extend(tail);
        let (got, _) = parse_split(&wire, &chunks, 1 << 20);
        // The valid prefix comes out first, whatever follows.
        prop_assert!(got.len() >= want.len());
        let want: Vec<Result<Msg, Error>> = want.into_iter().map(Ok).collect();
        prop_assert_eq!(&got[..want.len()], &want[..]);
    }
}
