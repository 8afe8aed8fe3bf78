// A minimal Node.js consumer of a ticker channel through Switchyard, with the SDK.
// Run with (the demo gateway running: cargo run --release -- --demo):
//   node --experimental-websocket examples/ticker-consumer/index.mjs [ws://127.0.0.1:8080/ws] [demo.ticker]
// (Node.js 20 has a global WebSocket behind that flag; Node.js 22 has it by default.)
import { Client } from "../../clients/js/dist/index.js";

const [url = "ws://127.0.0.1:8080/ws", channel = "demo.ticker"] = process.argv.slice(2);
const client = new Client({ urls: url });
client.on("state", ({ state }) => console.error(`[${state}]`));
client.on("recovered", (r) => console.error(`recovered: ${r.recovered} (epoch ${r.epoch})`));
client.on("message", (m) => {
  if (m.kind === "channel") console.log(JSON.stringify({ offset: m.offset, ...m.data }));
});
client.connect();
await client.subscribe(channel, { rewind: 1 }); // the last value first
process.on("SIGINT", () => {
  client.close();
  process.exit(0);
});
