// The BullMQ side of `python -m bench --only bullmq`: the same workloads as
// zaphub_db's, on BullMQ 5 and the local Redis. bench/bullmq.py copies this
// file next to a fresh `npm install bullmq@5` and runs it once per
// measurement; it prints one JSON line: {"seconds": ..., "count": ...}.
//
//   node bullmq_side.mjs single COUNT PRODUCERS    queue.add, PRODUCERS loops at once
//   node bullmq_side.mjs bulk COUNT SIZE           queue.addBulk, SIZE jobs a call
//   node bullmq_side.mjs drain COUNT CHATS WORKERS CONCURRENCY SEND_MS
//                                                  WORKERS processes, each a Worker
//   node bullmq_side.mjs worker QUEUE CONCURRENCY SEND_MS   (a child of drain)
import { fork } from "node:child_process";
import { Queue, Worker } from "bullmq";

const connection = { host: "127.0.0.1", port: 6379 };
const [command, ...args] = process.argv.slice(2);
const numbers = args.map(Number);
const name = `zaphub-bench-${process.pid}`;

function payload(i, chats) {
  return { sessionId: "bench", jid: `55349${String(i % chats).padStart(8, "0")}@s.whatsapp.net`,
           type: "text", payload: { text: `hello ${i}` }, messageId: `m${i}` };
}

async function single(count, producers) {
  const queue = new Queue(name, { connection });
  await queue.waitUntilReady();
  let next = 0;
  const started = performance.now();
  await Promise.all(Array.from({ length: producers }, async () => {
    while (next < count) {
      const i = next++;
      await queue.add("send", payload(i, 500), { jobId: `m${i}`, removeOnComplete: true });
    }
  }));
  const seconds = (performance.now() - started) / 1000;
  await queue.obliterate({ force: true });
  await queue.close();
  return { seconds, count };
}

async function bulk(count, size) {
  const queue = new Queue(name, { connection });
  await queue.waitUntilReady();
  const started = performance.now();
  for (let start = 0; start < count; start += size) {
    const jobs = [];
    for (let i = start; i < Math.min(start + size, count); i++) {
      jobs.push({ name: "send", data: payload(i, 500), opts: { jobId: `m${i}`, removeOnComplete: true } });
    }
    await queue.addBulk(jobs);
  }
  const seconds = (performance.now() - started) / 1000;
  await queue.obliterate({ force: true });
  await queue.close();
  return { seconds, count };
}

async function drain(count, chats, workers, concurrency, sendMs) {
  const queue = new Queue(name, { connection });
  await queue.waitUntilReady();
  await queue.pause();  // filled first, then drained from a standing start
  for (let start = 0; start < count; start += 1000) {
    const jobs = [];
    for (let i = start; i < Math.min(start + 1000, count); i++) {
      jobs.push({ name: "send", data: payload(i, chats), opts: { removeOnComplete: true } });
    }
    await queue.addBulk(jobs);
  }
  const children = Array.from({ length: workers }, () =>
    fork(new URL(import.meta.url).pathname, ["worker", name, String(concurrency), String(sendMs)]));
  await Promise.all(children.map((child) => new Promise((ready) => child.once("message", ready))));
  const started = performance.now();
  await queue.resume();
  for (;;) {
    const counts = await queue.getJobCounts("wait", "active", "delayed", "paused", "prioritized");
    if (Object.values(counts).every((n) => n === 0)) break;
    await new Promise((wake) => setTimeout(wake, 5));
  }
  const seconds = (performance.now() - started) / 1000;
  for (const child of children) child.send("stop");
  await Promise.all(children.map((child) => new Promise((gone) => child.once("exit", gone))));
  await queue.obliterate({ force: true });
  await queue.close();
  return { seconds, count };
}

async function worker(queueName, concurrency, sendMs) {
  const send = sendMs > 0 ? () => new Promise((done) => setTimeout(done, sendMs)) : async () => {};
  const consumer = new Worker(queueName, async () => { await send(); return "wamid"; },
                              { connection, concurrency });
  await consumer.waitUntilReady();
  process.send("ready");
  process.on("message", async () => { await consumer.close(); process.exit(0); });
}

if (command === "worker") {
  await worker(args[0], Number(args[1]), Number(args[2]));
} else {
  const run = { single, bulk, drain }[command];
  const result = await run(...numbers);
  console.log(JSON.stringify(result));
  process.exit(0);
}
