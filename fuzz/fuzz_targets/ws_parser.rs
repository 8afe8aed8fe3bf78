//! Client WebSocket frames: `ws::Parser` (protocol/src/ws.rs), the one parser every byte a
//! client sends goes through, fed in arbitrary splits.
//!
//! Two modes, chosen by the first byte: raw bytes, or frames built by the reference encoder
//! (mostly well formed, with fragments, controls, cut characters, close payloads, large
//! lengths), so both the header checks and the rules behind them are reached. A limit and two
//! budgets (frames, control frames) come from the input too. Each input is parsed with the
//! fuzzer's split, all at once, and (when short) byte by byte, and each run is compared with
//! the reference decoder in fuzz/src/lib.rs, at every split point: the messages, the charges
//! and the error become known exactly when the bytes that complete them have been fed.
#![no_main]

use arbitrary::Unstructured;
use libfuzzer_sys::fuzz_target;
use switchyard_fuzz::{arb_ref_frame, ref_encode, ref_ws, RefMsg, RefRun};
use switchyard_protocol::ws::{Budget, Flood, FrameKind, Msg, Parser, MAX_CONTROL, MAX_HEADER, RESERVE_MAX};

/// A budget of so many headers, recording each charge.
struct Counted {
    frames: Option<usize>,
    control: Option<usize>,
    charges: Vec<u8>,
}

impl Budget for Counted {
    fn charge(&mut self, kind: FrameKind) -> Result<(), Flood> {
        self.charges.push(match kind {
            FrameKind::Data => 0,
            FrameKind::Continuation => 1,
            FrameKind::Control => 2,
        });
        match &mut self.frames {
            Some(0) => return Err(Flood::Frames),
            Some(n) => *n -= 1,
            None => {}
        }
        if kind == FrameKind::Control {
            match &mut self.control {
                Some(0) => return Err(Flood::Control),
                Some(n) => *n -= 1,
                None => {}
            }
        }
        Ok(())
    }
}

fn as_ref_msg(m: Msg) -> RefMsg {
    match m {
        Msg::Text(t) => RefMsg::Text(t.to_vec()),
        Msg::Binary(b) => RefMsg::Binary(b.to_vec()),
        Msg::Ping(p) => RefMsg::Ping(p.to_vec()),
        Msg::Pong => RefMsg::Pong,
        Msg::Close(c) => RefMsg::Close(c),
    }
}

/// Feeds `wire` in chunks of `chunks` (cycled), draining after each, checking against `want`.
fn run(wire: &[u8], max: usize, budget: (Option<usize>, Option<usize>), chunks: &[usize], want: &RefRun) {
    let mut p = Parser::new(max);
    let mut b = Counted {
        frames: budget.0,
        control: budget.1,
        charges: Vec::new(),
    };
    let mut msgs: Vec<RefMsg> = Vec::new();
    let mut error = None;
    let (mut fed, mut sizes) = (0usize, chunks.iter().cycle());
    // At most ~2048 chunks per run, so large frames stay fast to fuzz.
    let floor = (wire.len() / 2048).max(1);
    let biggest = chunks.iter().copied().max().unwrap_or(1).max(floor);
    while fed < wire.len() && error.is_none() {
        let n = (*sizes.next().expect("one chunk size at least"))
            .max(floor)
            .min(wire.len() - fed);
        let chunk = &wire[fed..fed + n];
        fed += n;
        let mut r = p.feed(chunk, &mut b);
        loop {
            match r {
                Ok(Some(m)) => {
                    match &m {
                        Msg::Text(t) => {
                            assert!(t.len() <= max, "text of {} bytes, limit {max}", t.len());
                            assert!(std::str::from_utf8(t).is_ok(), "text is not UTF-8");
                        }
                        Msg::Binary(d) => assert!(d.len() <= max, "binary of {} bytes, limit {max}", d.len()),
                        Msg::Ping(d) => assert!(d.len() <= MAX_CONTROL),
                        Msg::Close(Some((_, reason))) => assert!(reason.len() <= MAX_CONTROL - 2),
                        Msg::Pong | Msg::Close(None) => {}
                    }
                    msgs.push(as_ref_msg(m));
                    r = p.next(&mut b);
                }
                Ok(None) => break,
                Err(e) => {
                    error = Some(e);
                    break;
                }
            }
        }
        // Exactly what the bytes fed so far complete, no more, no less, and nothing owed.
        let due = want.msgs.iter().take_while(|(_, end)| *end <= fed).count();
        assert_eq!(msgs.len(), due, "messages after {fed} bytes");
        let charged = want.charges.iter().take_while(|(_, end)| *end <= fed).count();
        assert_eq!(b.charges.len(), charged, "charges after {fed} bytes");
        let failed = want.error.as_ref().filter(|(_, at)| *at <= fed);
        assert_eq!(
            error.map(|e| e.to_string()).as_ref(),
            failed.map(|(what, _)| what),
            "error after {fed} bytes"
        );
        let charges = b.charges.len();
        match error {
            // Need more stays need more without more bytes, and charges nothing.
            None => {
                assert_eq!(p.next(&mut b), Ok(None));
                assert_eq!(p.feed(&[], &mut b), Ok(None));
            }
            // An error is final.
            Some(e) => {
                assert_eq!(p.next(&mut b), Err(e));
                assert_eq!(p.feed(chunk, &mut b), Err(e));
                assert!(p.is_idle() && p.capacity() == 0, "buffers kept after an error");
            }
        }
        assert_eq!(b.charges.len(), charges, "charged without a new header");
        // Memory: what is held is one incomplete frame (a control frame may exceed a small
        // limit) and one unfinished message at most; the heap is what arrived (amortised) plus
        // 64 KiB ahead; nothing while idle.
        assert!(
            p.buffered() <= max + max.max(MAX_CONTROL).max(MAX_HEADER),
            "{} bytes held, limit {max}",
            p.buffered()
        );
        assert!(
            p.capacity() <= 2 * (p.buffered() + RESERVE_MAX + biggest) + 64,
            "{} bytes of heap for {} held",
            p.capacity(),
            p.buffered()
        );
        if p.is_idle() {
            assert_eq!(p.capacity(), 0, "a buffer kept while idle");
        }
    }
    let want_msgs: Vec<&RefMsg> = want.msgs.iter().map(|(m, _)| m).collect();
    assert_eq!(msgs.iter().collect::<Vec<_>>(), want_msgs);
    let want_kinds: Vec<u8> = want.charges.iter().map(|(k, _)| *k).collect();
    assert_eq!(b.charges, want_kinds);
    if want.error.is_none() {
        assert_eq!(p.is_idle(), want.idle, "ends cleanly");
    }
}

fuzz_target!(|data: &[u8]| {
    let mut u = Unstructured::new(data);
    let (Ok(mode), Ok(max), Ok(frames), Ok(control)) = (
        u.arbitrary::<u8>(),
        u.int_in_range(0..=200_000usize),
        u.arbitrary::<Option<u8>>(),
        u.arbitrary::<Option<u8>>(),
    ) else {
        return;
    };
    let max = if mode & 2 == 0 { max.min(300) } else { max };
    let mut chunks = Vec::new();
    for _ in 0..u.int_in_range(1..=6u8).unwrap_or(1) {
        chunks.push(u.int_in_range(1..=5000usize).unwrap_or(1));
    }
    let wire = if mode & 1 == 0 {
        u.take_rest().to_vec()
    } else {
        let mut wire = Vec::new();
        while !u.is_empty() && wire.len() < 1 << 20 {
            let Ok(f) = arb_ref_frame(&mut u) else { break };
            wire.extend(ref_encode(&f));
        }
        wire
    };
    let budget = (frames.map(usize::from), control.map(usize::from));
    let want = ref_ws(&wire, max, budget.0, budget.1);
    run(&wire, max, budget, &chunks, &want);
    run(&wire, max, budget, &[wire.len().max(1)], &want);
    if wire.len() <= 2048 {
        run(&wire, max, budget, &[1], &want);
    }
});
