// gRPC load generator in Node.js (built-in http2 module, no packages):
// unsigned refund.v1.RefundService/Refund calls, --concurrency in flight, each
// on a distinct order, for --duration seconds or until the orders run out.
// Same arguments and the same one-line JSON result as bench/loadgen_grpc.py,
// which it replaces when `node` is installed: a Python gRPC client costs
// about 200 us of CPU per call, this one several times less, and both run on
// the cores of the service they measure.
//
// A request is the 5-byte gRPC frame header and a RefundRequest encoded by
// hand (field 1 merchant_id, 2 order_id, 4 amount); answers are not parsed,
// only their grpc-status is counted.

import http2 from "node:http2";

const STATUS_NAMES = ["OK", "CANCELLED", "UNKNOWN", "INVALID_ARGUMENT", "DEADLINE_EXCEEDED", "NOT_FOUND",
  "ALREADY_EXISTS", "PERMISSION_DENIED", "RESOURCE_EXHAUSTED", "FAILED_PRECONDITION", "ABORTED", "OUT_OF_RANGE",
  "UNIMPLEMENTED", "INTERNAL", "UNAVAILABLE", "DATA_LOSS", "UNAUTHENTICATED"];

function parseArgs(argv) {
  const args = { target: [], merchant: [], amount: "10.00", concurrency: 32, duration: 8 };
  for (let i = 0; i < argv.length; i += 2) {
    const name = argv[i].replace(/^--/, "").replace(/-([a-z])/g, (_, c) => c.toUpperCase());
    const value = argv[i + 1];
    if (Array.isArray(args[name])) args[name].push(value);
    else args[name] = value;
  }
  for (const key of ["firstOrder", "orders", "concurrency"]) args[key] = parseInt(args[key], 10);
  args.duration = parseFloat(args.duration);
  args.merchant = args.merchant.map(Number);
  return args;
}

function varint(value) {
  const bytes = [];
  let v = BigInt(value);
  while (v > 127n) {
    bytes.push(Number(v & 127n) | 128);
    v >>= 7n;
  }
  bytes.push(Number(v));
  return Buffer.from(bytes);
}

function field(tag, payload) {
  return Buffer.concat([Buffer.from([tag]), varint(payload.length), payload]);
}

function refundRequest(merchantId, orderId, amount) {
  const message = Buffer.concat([
    field(0x0a, Buffer.from(String(merchantId))),
    Buffer.from([0x10]), varint(orderId),
    field(0x22, Buffer.from(amount)),
  ]);
  const frame = Buffer.alloc(5 + message.length);
  frame.writeUInt8(0, 0);
  frame.writeUInt32BE(message.length, 1);
  message.copy(frame, 5);
  return frame;
}

function percentile(sorted, p) {
  if (!sorted.length) return NaN;
  const index = Math.min(sorted.length - 1, Math.max(0, Math.round((p / 100) * sorted.length + 0.5) - 1));
  return sorted[index];
}

async function main() {
  const args = parseArgs(process.argv.slice(2));
  const sessions = args.target.map((target) => http2.connect(`http://${target}`));
  await Promise.all(sessions.map((s) => new Promise((resolve, reject) => {
    s.once("connect", resolve);
    s.once("error", reject);
  })));
  const bodies = [];
  for (let i = 0; i < args.orders; i++) {
    bodies.push(refundRequest(args.merchant[i % args.merchant.length], args.firstOrder + i, args.amount));
  }
  const headers = {
    ":method": "POST", ":path": "/refund.v1.RefundService/Refund", "content-type": "application/grpc",
    "te": "trailers", "grpc-timeout": "10S",
  };
  const latencies = [];
  const codes = {};
  let next = 0;
  const cpu0 = process.cpuUsage();
  const start = process.hrtime.bigint();
  const stopAt = start + BigInt(Math.round(args.duration * 1e9));

  function call(session, body) {
    return new Promise((resolve) => {
      const began = process.hrtime.bigint();
      const stream = session.request(headers);
      let status = null;
      stream.on("response", (h) => { if (h["grpc-status"] !== undefined) status = h["grpc-status"]; });
      stream.on("trailers", (t) => { if (t["grpc-status"] !== undefined) status = t["grpc-status"]; });
      stream.on("data", () => {});
      stream.on("error", () => { status = status ?? "14"; });
      stream.on("close", () => {
        const name = STATUS_NAMES[Number(status ?? 2)] ?? `CODE_${status}`;
        codes[name] = (codes[name] || 0) + 1;
        latencies.push(Number(process.hrtime.bigint() - began) / 1e6);
        resolve();
      });
      stream.end(body);
    });
  }

  async function worker(number) {
    const session = sessions[number % sessions.length];
    while (next < bodies.length && process.hrtime.bigint() < stopAt) {
      const body = bodies[next++];
      await call(session, body);
    }
  }

  await Promise.all(Array.from({ length: args.concurrency }, (_, i) => worker(i)));
  const seconds = Number(process.hrtime.bigint() - start) / 1e9;
  const cpu = process.cpuUsage(cpu0);
  for (const s of sessions) s.close();
  latencies.sort((a, b) => a - b);
  const done = latencies.length;
  process.stdout.write(JSON.stringify({
    requests: done, seconds, rate: done / seconds, p50_ms: percentile(latencies, 50),
    p99_ms: percentile(latencies, 99), codes, exhausted: next >= bodies.length,
    client_cpu_us: done ? (cpu.user + cpu.system) / done : null, pid: process.pid, client: "node",
  }) + "\n");
}

main().catch((error) => {
  console.error(error);
  process.exit(1);
});
