#!/usr/bin/env node
// A producer in another language: publishes NDJSON rows as snowpipe.ingest_batch messages to
// Redis or RabbitMQ, in the exact form docs/message-format.md describes (Celery message
// protocol 2, JSON). Running it again with the same input and --id-prefix publishes the same
// batch ids, which the worker logs once: each row is committed exactly once.
//
//   npm ci
//   node publish.mjs --broker redis://127.0.0.1:6379/0 --queue snowpipe.ingest \
//       --database DEMO --schema PUBLIC --pipe EVENTS --id-prefix orders-2026-01-02 rows.ndjson
//
// --broker amqp://guest:guest@127.0.0.1:5672// publishes to RabbitMQ instead (start a worker
// first: it declares the queue). --batch-rows N rows per batch (default 100). --form ndjson
// sends each batch's lines as one NDJSON string, exactly as they are in the file (the worker
// stores them as sent: cheaper for the worker, and numbers keep every digit, which JSON.parse
// would round); only workers that know the NDJSON form read it.
import { randomUUID } from "node:crypto";
import { readFileSync } from "node:fs";
import { hostname } from "node:os";
import { parseArgs } from "node:util";

const TASK = "snowpipe.ingest_batch";

const USAGE =
  "usage: node publish.mjs --broker URL [--queue NAME] --database DB --schema SCHEMA " +
  "--pipe PIPE --id-prefix PREFIX [--batch-rows N] [--form rows|ndjson] FILE.ndjson\n" +
  "  --broker      redis://HOST:PORT/DB or amqp://USER:PASSWORD@HOST:PORT/VHOST\n" +
  "  --queue       the worker's SNOWPIPE_QUEUE_NAME (default snowpipe.ingest)\n" +
  "  --id-prefix   batch ids are PREFIX-0, PREFIX-1, ...: the same input and prefix publish\n" +
  "                the same ids, so a run repeated after a failure commits each row once\n" +
  "  --batch-rows  rows per batch (default 100)\n" +
  "  --form        rows: an array of objects (default); ndjson: the lines as they are";

function usage(message) {
  console.error(`error: ${message}`);
  console.error(USAGE);
  process.exit(2);
}

let parsed;
try {
  parsed = parseArgs({
    options: {
      broker: { type: "string" },
      queue: { type: "string", default: "snowpipe.ingest" },
      database: { type: "string" },
      schema: { type: "string" },
      pipe: { type: "string" },
      "id-prefix": { type: "string" },
      "batch-rows": { type: "string", default: "100" },
      form: { type: "string", default: "rows" },
      help: { type: "boolean", default: false },
    },
    allowPositionals: true,
  });
} catch (err) {
  usage(err.message);
}
const { values: opts, positionals } = parsed;
if (opts.help) {
  console.log(USAGE);
  process.exit(0);
}
for (const name of ["broker", "database", "schema", "pipe", "id-prefix"]) {
  if (!opts[name]) usage(`--${name} is required`);
}
if (positionals.length !== 1) usage("name one NDJSON file");
const batchRows = Number.parseInt(opts["batch-rows"], 10);
if (!(batchRows > 0)) usage("--batch-rows must be a whole number above 0");
if (!["rows", "ndjson"].includes(opts.form)) usage("--form must be rows or ndjson");

// Every line is one row: a JSON object. A bad line stops the run before anything is sent.
const rows = readFileSync(positionals[0], "utf8")
  .split("\n")
  .map((line, n) => [line.trim(), n + 1])
  .filter(([line]) => line !== "")
  .map(([line, n]) => {
    let row;
    try {
      row = JSON.parse(line);
    } catch (err) {
      usage(`line ${n} is not JSON (${err.message}): fix the line`);
    }
    if (row === null || typeof row !== "object" || Array.isArray(row)) {
      usage(`line ${n} is not a JSON object: each line is one row`);
    }
    if (Object.keys(row).length === 0) usage(`line ${n} is an empty object: a row needs a column`);
    return { row, line };
  });
if (rows.length === 0) usage("the file has no rows");

// One message per batch: the body and the headers of Celery message protocol 2.
function message(n, batch) {
  const id = `${opts["id-prefix"]}-${n}`;
  const kwargs = {
    batch_id: id,
    database: opts.database,
    schema: opts.schema,
    pipe: opts.pipe,
  };
  if (opts.form === "ndjson") {
    // The lines as read (each checked to be a JSON object above), one per row.
    kwargs.ndjson = batch.map((r) => r.line).join("\n") + "\n";
    kwargs.row_count = batch.length;
  } else {
    kwargs.rows = batch.map((r) => r.row);
  }
  const body = JSON.stringify([[], kwargs, { callbacks: null, errbacks: null, chain: null, chord: null }]);
  const headers = {
    lang: "js",
    task: TASK,
    id,
    root_id: id,
    parent_id: null,
    group: null,
    retries: 0,
    timelimit: [null, null],
    argsrepr: "()",
    kwargsrepr: `{batch_id: ${id}, rows: ${batch.length}}`,
    origin: `node@${hostname()}`,
  };
  return { id, body: Buffer.from(body, "utf8"), headers };
}

const batches = [];
for (let start = 0; start < rows.length; start += batchRows) {
  batches.push(message(batches.length, rows.slice(start, start + batchRows)));
}

// Redis (kombu's transport): LPUSH onto the list named like the queue, wrapped in kombu's
// envelope; the body travels base64-encoded.
async function publishRedis(url) {
  const { createClient } = await import("redis");
  const client = createClient({ url });
  client.on("error", (err) => console.error(`redis: ${err.message}`));
  await client.connect();
  try {
    for (const m of batches) {
      const envelope = {
        body: m.body.toString("base64"),
        "content-encoding": "utf-8",
        "content-type": "application/json",
        headers: m.headers,
        properties: {
          correlation_id: m.id,
          delivery_mode: 2,
          delivery_info: { exchange: "", routing_key: opts.queue },
          priority: 0,
          body_encoding: "base64",
          delivery_tag: randomUUID(),
        },
      };
      await client.lPush(opts.queue, JSON.stringify(envelope));
    }
  } finally {
    await client.close();
  }
}

// RabbitMQ: publish to the worker's direct exchange (named like the queue), routing key = queue,
// persistent, with publisher confirms.
async function publishAmqp(url) {
  const amqp = await import("amqplib");
  const connection = await amqp.connect(url);
  try {
    const channel = await connection.createConfirmChannel();
    await channel.checkQueue(opts.queue).catch((err) => {
      throw new Error(`queue ${opts.queue} does not exist (start a worker first): ${err.message}`);
    });
    for (const m of batches) {
      channel.publish(opts.queue, opts.queue, m.body, {
        contentType: "application/json",
        contentEncoding: "utf-8",
        headers: m.headers,
        correlationId: m.id,
        persistent: true,
        mandatory: true,
      });
    }
    await channel.waitForConfirms();
    await channel.close();
  } finally {
    await connection.close();
  }
}

const publish = opts.broker.startsWith("redis") ? publishRedis : publishAmqp;
try {
  await publish(opts.broker);
} catch (err) {
  console.error(`error: publishing failed: ${err.message} (publishing again is safe)`);
  process.exit(1);
}
console.log(`published ${rows.length} rows in ${batches.length} batches (${batches[0].id} ...)`);
