// berth from Node.js, with nothing but the protos: what a TypeScript or Go team does first.
// Run by tests/integration/test_node_client.py against `berthd up` (BERTH_CLUSTER).
import assert from "node:assert/strict";
import { readFileSync } from "node:fs";
import { randomUUID } from "node:crypto";
import { before, after, test } from "node:test";

import {
  CODE,
  bidi,
  chunks,
  clientStream,
  collect,
  connect,
  errorDetails,
  gzip,
  sha256,
  sleep,
  tar,
  unary,
} from "./berth.mjs";

const IMAGE = "node-client/busybox:1";
let s; // stubs
const started = []; // container ids to remove at the end

before(async () => {
  s = await connect(process.env.BERTH_CLUSTER);
});

after(async () => {
  for (const container of started) {
    await unary(s.cluster, "RemoveContainer", { container, force: true }).catch(() => {});
  }
});

async function rejects(promise) {
  try {
    await promise;
  } catch (err) {
    return err;
  }
  assert.fail("the call succeeded");
}

async function uploadBlob(repository, bytes, digest) {
  const { upload_id } = await unary(s.registry, "StartUpload", {
    repository,
    request_id: randomUUID(),
  });
  let offset = 0;
  const requests = [];
  for (const chunk of chunks(bytes)) {
    requests.push({ upload_id, offset, data: chunk });
    offset += chunk.length;
  }
  const written = await clientStream(s.registry, "WriteUpload", requests);
  assert.equal(Number(written.offset), bytes.length);
  return unary(s.registry, "CommitUpload", { upload_id, digest: digest ?? sha256(bytes) });
}

test("registry: a blob with a wrong digest is refused with its details, the right one stored", async () => {
  const bytes = Buffer.from("hello from node\n");
  const wrong = sha256(Buffer.from("something else"));
  const err = await rejects(uploadBlob("node-client/blobs", bytes, wrong));
  assert.equal(err.code, CODE.DATA_LOSS);
  const details = errorDetails(err);
  assert.equal(details.reason, "DIGEST_MISMATCH");
  assert.equal(details.metadata.expected, wrong);
  assert.equal(details.metadata.actual, sha256(bytes));

  const missing = await rejects(
    unary(s.registry, "StatBlob", { repository: "node-client/blobs", digest: sha256(bytes) }),
  );
  assert.equal(missing.code, CODE.NOT_FOUND);
  assert.equal(errorDetails(missing).reason, "BLOB_UNKNOWN");

  const committed = await uploadBlob("node-client/blobs", bytes);
  assert.equal(committed.descriptor.digest, sha256(bytes));
  const read = await collect(
    s.registry.ReadBlob({ repository: "node-client/blobs", digest: sha256(bytes) }),
  );
  assert.deepEqual(Buffer.concat(read.map((r) => r.data)), bytes);
});

test("builder: a build streams progress and its steps, and applies .dockerignore itself", async () => {
  const context = await gzip(
    tar({
      Dockerfile: Buffer.from(
        [
          "FROM scratch",
          "COPY busybox /bin/busybox",
          'RUN ["/bin/busybox", "--install", "-s", "/bin"]',
          "RUN echo built by node | tee /greeting",
          'CMD ["sh"]',
          "",
        ].join("\n"),
      ),
      ".dockerignore": Buffer.from("secret.txt\n"),
      "secret.txt": Buffer.from("must not reach the image\n"),
      busybox: { data: readFileSync(process.env.BUSYBOX), mode: 0o755 },
    }),
  );
  const requests = [{ options: { tags: [IMAGE] } }];
  for (const chunk of chunks(context)) requests.push({ context: chunk });
  const events = await bidi(s.builder, "Build", requests);
  const kinds = new Set(events.map((e) => e.event));
  assert.ok(kinds.has("progress"), [...kinds].join());
  assert.ok(kinds.has("step"));
  assert.ok(kinds.has("output"));
  const result = events.at(-1);
  assert.equal(result.event, "result");
  assert.match(result.result.digest, /^sha256:[0-9a-f]{64}$/);
  const steps = events.filter((e) => e.event === "step").map((e) => e.step);
  assert.ok(steps.some((st) => st.progress.state === "PROGRESS_STATE_DONE"));

  // The ignored file was sent but the server left it out: COPY cannot find it.
  const ignored = await gzip(
    tar({
      Dockerfile: Buffer.from("FROM scratch\nCOPY secret.txt /\n"),
      ".dockerignore": Buffer.from("secret.txt\n"),
      "secret.txt": Buffer.from("x\n"),
    }),
  );
  const err = await rejects(bidi(s.builder, "Build", [{ options: {} }, { context: ignored }]));
  assert.ok([CODE.INVALID_ARGUMENT, CODE.NOT_FOUND].includes(err.code), err.details);
  assert.match(err.details, /secret\.txt/);
});

async function run(spec, extra = {}) {
  const { container } = await unary(s.cluster, "RunContainer", {
    spec: { image: IMAGE, ...spec },
    ...extra,
  });
  started.push(container.id);
  return container;
}

test("cluster: a container runs, its output arrives from the first byte, its exit code is 3", async () => {
  const request_id = randomUUID();
  const container = await run(
    { command: ["sh", "-c", "echo hello; echo oops >&2; exit 3"] },
    { request_id },
  );
  // Followed right after the run: nothing is lost while the node creates the container.
  const lines = await collect(s.cluster.ContainerLogs({ container: container.id, follow: true }));
  const text = (stream) =>
    Buffer.concat(lines.filter((l) => l.stream === stream).map((l) => l.data)).toString();
  assert.equal(text("LOG_STREAM_STDOUT"), "hello\n");
  assert.equal(text("LOG_STREAM_STDERR"), "oops\n");
  const waited = await collect(s.cluster.WaitContainer({ container: container.id }));
  assert.equal(waited.at(-1).exit_code, 3);

  // The same request_id again: the same container, not a second one.
  const again = await run(
    { command: ["sh", "-c", "echo hello; echo oops >&2; exit 3"] },
    { request_id },
  );
  assert.equal(again.id, container.id);
});

test("cluster: a container that cannot be created fails fast, with a reason", async () => {
  const { container } = await unary(s.cluster, "RunContainer", {
    spec: { image: "node-client/nosuch:1" },
  });
  started.push(container.id);
  const t0 = Date.now();
  const err = await rejects(collect(s.cluster.WaitContainer({ container: container.id })));
  assert.ok(Date.now() - t0 < 30000);
  assert.equal(err.code, CODE.FAILED_PRECONDITION);
  const details = errorDetails(err);
  assert.equal(details.reason, "CONTAINER_CREATE_FAILED");
  assert.equal(details.metadata.failure_reason, "IMAGE_NOT_FOUND");
  const { container: seen } = await unary(s.cluster, "GetContainer", { container: container.id });
  assert.equal(seen.status.state, "CONTAINER_STATE_CREATE_FAILED");
  assert.equal(seen.status.failure.reason, "IMAGE_NOT_FOUND");
});

test("cluster: exec runs a process with stdin in a running container", async () => {
  const container = await run({ command: ["sleep", "300"] });
  let running = false;
  for (let i = 0; i < 100 && !running; i++) {
    const { container: seen } = await unary(s.cluster, "GetContainer", {
      container: container.id,
    });
    running = seen.status?.state === "CONTAINER_STATE_RUNNING";
    if (!running) await sleep(200);
  }
  assert.ok(running, "the container never ran");
  const replies = await bidi(s.cluster, "Exec", [
    { start: { container: container.id, command: ["sh", "-c", "cat; echo done; exit 5"] } },
    { input: { stdin: Buffer.from("abc") } },
    { input: { close_stdin: true } },
  ]);
  const outputs = replies.map((r) => r.output);
  const stdout = Buffer.concat(outputs.filter((o) => o.output === "stdout").map((o) => o.stdout));
  assert.equal(stdout.toString(), "abcdone\n");
  const last = outputs.at(-1);
  assert.equal(last.output, "exit");
  assert.equal(last.exit.exit_code, 5);
});

test("cluster: a service is created and scaled, its replicas listed a page at a time", async () => {
  const name = "node-client-web";
  const { service } = await unary(s.cluster, "CreateService", {
    spec: { name, template: { image: IMAGE, command: ["sleep", "300"] }, replicas: 1 },
    request_id: randomUUID(),
  });
  try {
    await unary(s.cluster, "ScaleService", { service: service.id, replicas: 2 });
    let running = 0;
    for (let i = 0; i < 150 && running < 2; i++) {
      const { services } = await unary(s.cluster, "ListServices", { page_size: 100 });
      running = services.find((x) => x.id === service.id)?.running_replicas ?? 0;
      if (running < 2) await sleep(200);
    }
    assert.equal(running, 2);
    const first = await unary(s.cluster, "ListServiceReplicas", { service: name, page_size: 1 });
    assert.equal(first.containers.length, 1);
    assert.ok(first.next_page_token);
    const second = await unary(s.cluster, "ListServiceReplicas", {
      service: name,
      page_size: 1,
      page_token: first.next_page_token,
    });
    assert.equal(second.containers.length, 1);
    assert.notEqual(second.containers[0].id, first.containers[0].id);
  } finally {
    await unary(s.cluster, "RemoveService", { service: service.id });
  }
});
