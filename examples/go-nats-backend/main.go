// A Switchyard backend in Go with the stock NATS client (nats.go): no Switchyard code.
//
// It subscribes to a route's inbound partition subjects (<prefix>.in.<topic>.p<N>) as a queue
// group, reads the envelope from the headers, and answers each client frame with "go:" + the
// frame, straight to the node holding the session (the record's sy-reply subject), with the
// session in the sy-session header (NATS messages have no key) and the frame's opcode.
//
// Run with:
//
//	scripts/build-examples   # or: cd examples/go-nats-backend && go build
//	target/examples-build/go-nats-backend --nats nats://127.0.0.1:4222 --topic echo
//
// Per-session order: a queue group hands each message to an arbitrary member, so with one
// process every session's replies keep their order, and with several in one group they may
// not (docs/protocol.md). To spread a pool and keep order, give each process its own
// partitions (--partitions 0,1,2,...), each with its own --queue name or none.
package main

import (
	"flag"
	"fmt"
	"log"
	"os"
	"os/signal"
	"strings"
	"sync/atomic"
	"syscall"

	"github.com/nats-io/nats.go"
)

// header returns the first value of a header, names compared case-insensitively as the
// contract says (nats.go's Header.Get is case-sensitive).
func header(h nats.Header, name string) string {
	for k, v := range h {
		if strings.EqualFold(k, name) && len(v) > 0 {
			return v[0]
		}
	}
	return ""
}

func main() {
	url := flag.String("nats", nats.DefaultURL, "NATS server URL")
	prefix := flag.String("prefix", "sy", "Switchyard's --prefix")
	topic := flag.String("topic", "echo", "the route's inbound topic")
	queue := flag.String("queue", "go-backend", "queue group name (empty: a plain subscription)")
	partitions := flag.String("partitions", "", "comma-separated partition numbers (default: all)")
	viaRouter := flag.Bool("via-router", false, "reply through the routers' subject (<prefix>.out), not sy-reply")
	flag.Parse()
	log.SetFlags(0)

	closed := make(chan struct{})
	nc, err := nats.Connect(*url, nats.Name("go-nats-backend"), nats.MaxReconnects(-1),
		nats.ClosedHandler(func(*nats.Conn) { close(closed) }))
	if err != nil {
		log.Fatalf("go nats backend: connect %s: %v", *url, err)
	}
	var answered atomic.Uint64
	onMsg := func(m *nats.Msg) {
		if header(m.Header, "sy-kind") != "frame" {
			return // connect / disconnect: a real backend would track sessions here
		}
		session := header(m.Header, "sy-session")
		if session == "" {
			log.Printf("go nats backend: a frame on %s without sy-session, skipped", m.Subject)
			return
		}
		// sy-reply reaches the node holding the session; without it (or with --via-router),
		// the routers' subject.
		reply := header(m.Header, "sy-reply")
		if reply == "" || *viaRouter {
			reply = *prefix + ".out"
		}
		out := nats.NewMsg(reply)
		out.Data = append([]byte("go:"), m.Data...)
		out.Header.Set("sy-session", session)
		out.Header.Set("sy-kind", "deliver")
		if op := header(m.Header, "sy-opcode"); op != "" {
			out.Header.Set("sy-opcode", op)
		}
		if err := nc.PublishMsg(out); err != nil {
			log.Printf("go nats backend: reply to %s: %v", session, err)
			return
		}
		answered.Add(1)
	}

	base := *prefix + ".in." + *topic
	var subjects []string
	if *partitions == "" {
		subjects = []string{base + ".*"}
	} else {
		for _, p := range strings.Split(*partitions, ",") {
			subjects = append(subjects, base+".p"+strings.TrimSpace(p))
		}
	}
	for _, s := range subjects {
		if *queue == "" {
			_, err = nc.Subscribe(s, onMsg)
		} else {
			_, err = nc.QueueSubscribe(s, *queue, onMsg)
		}
		if err != nil {
			log.Fatalf("go nats backend: subscribe %s: %v", s, err)
		}
	}
	if err := nc.Flush(); err != nil {
		log.Fatalf("go nats backend: flush: %v", err)
	}
	fmt.Printf("go nats backend ready on %s (queue group %q)\n", strings.Join(subjects, ", "), *queue)

	stop := make(chan os.Signal, 1)
	signal.Notify(stop, syscall.SIGTERM, syscall.SIGINT)
	<-stop
	if err := nc.Drain(); err != nil {
		log.Printf("go nats backend: drain: %v", err)
	}
	<-closed // Drain ends by closing the connection
	log.Printf("go nats backend stopped: answered %d frames", answered.Load())
}
