// A berth client made the way a TypeScript or JavaScript team would make one: the .proto
// files loaded at run time with @grpc/proto-loader, Google's standard protos from
// google-proto-files, and nothing from berth's Python code. Only the cluster's address is
// given (BERTH_CLUSTER); every other service is found through GetEndpoints.
//
// Every berth port speaks TLS with certificates from the cluster CA: BERTH_TLS_CA names the CA
// file (`berthd up` writes <state>/tls/ca.crt). With BERTH_TOKEN the client dials the services'
// public ports and sends the token in every call's metadata (`authorization: Bearer`), as a
// user's program would; otherwise it presents a client certificate (BERTH_TLS_CERT and
// BERTH_TLS_KEY) to their main ports (mutual TLS).
import { readFileSync } from "node:fs";
import { createGzip } from "node:zlib";
import { createHash } from "node:crypto";
import path from "node:path";
import { fileURLToPath } from "node:url";

import grpc from "@grpc/grpc-js";
import protoLoader from "@grpc/proto-loader";
import googleProtoFiles from "google-proto-files";
import protobuf from "protobufjs";

const here = path.dirname(fileURLToPath(import.meta.url));
export const PROTOS = path.resolve(here, "../../../protos");
const GOOGLE = googleProtoFiles.getProtoPath("..");

const FILES = [
  "berth/registry/v1/registry.proto",
  "berth/image/v1/image.proto",
  "berth/builder/v1/builder.proto",
  "berth/node/v1/node.proto",
  "berth/cluster/v1/cluster.proto",
];

const definition = protoLoader.loadSync(FILES, {
  includeDirs: [PROTOS, GOOGLE],
  keepCase: true,
  longs: Number,
  enums: String,
  defaults: true,
  oneofs: true,
});
export const api = grpc.loadPackageDefinition(definition);

// google.rpc.Status and its details, to read the structured part of an error.
const rpcRoot = new protobuf.Root();
rpcRoot.resolvePath = (_origin, target) => path.join(GOOGLE, target);
rpcRoot.loadSync(["google/rpc/status.proto", "google/rpc/error_details.proto"]);
const Status = rpcRoot.lookupType("google.rpc.Status");

/** The details of a failed call: { reason, metadata, resource, fieldViolations, violations }. */
export function errorDetails(err) {
  const raw = err?.metadata?.get("grpc-status-details-bin")?.[0];
  const out = { reason: "", metadata: {}, resource: null, fieldViolations: [], violations: [] };
  if (!raw) return out;
  const status = Status.decode(raw);
  for (const detail of status.details) {
    const name = detail.type_url.split("/").pop();
    const type = rpcRoot.lookupType(name);
    const value = type.toObject(type.decode(detail.value), { defaults: true });
    if (name === "google.rpc.ErrorInfo") {
      out.reason = value.reason;
      out.domain = value.domain;
      out.metadata = value.metadata;
    } else if (name === "google.rpc.ResourceInfo") {
      out.resource = { type: value.resourceType, name: value.resourceName };
    } else if (name === "google.rpc.BadRequest") {
      out.fieldViolations = value.fieldViolations;
    } else if (name === "google.rpc.PreconditionFailure") {
      out.violations = value.violations;
    }
  }
  return out;
}

export const CODE = grpc.status;

/** Promise-returning unary calls: `await unary(stub, "Method", request)`. */
export function unary(stub, method, request, deadlineSeconds = 60) {
  return new Promise((resolve, reject) => {
    const deadline = new Date(Date.now() + deadlineSeconds * 1000);
    stub[method](request, { deadline }, (err, reply) => (err ? reject(err) : resolve(reply)));
  });
}

/** Every message of a server stream, as an array. */
export function collect(call) {
  return new Promise((resolve, reject) => {
    const messages = [];
    call.on("data", (m) => messages.push(m));
    call.on("error", reject);
    call.on("end", () => resolve(messages));
  });
}

/** A client-streaming call: write every request, half-close, await the single reply. */
export function clientStream(stub, method, requests) {
  return new Promise((resolve, reject) => {
    const call = stub[method]((err, reply) => (err ? reject(err) : resolve(reply)));
    for (const request of requests) call.write(request);
    call.end();
  });
}

/** A bidirectional call: write every request, half-close, collect every reply. */
export function bidi(stub, method, requests) {
  const call = stub[method]();
  const done = collect(call);
  for (const request of requests) call.write(request);
  call.end();
  return done;
}

/** TLS credentials: the CA file BERTH_TLS_CA names, and BERTH_TOKEN in every call's metadata,
 * else the client certificate and key BERTH_TLS_CERT and BERTH_TLS_KEY name. */
export function credentials(env = process.env) {
  if (!env.BERTH_TLS_CA) throw new Error("BERTH_TLS_CA must name the cluster's CA file");
  const read = (name) => (env[name] ? readFileSync(env[name]) : null);
  if (env.BERTH_TOKEN) {
    return grpc.credentials.combineChannelCredentials(
      grpc.credentials.createSsl(read("BERTH_TLS_CA")),
      grpc.credentials.createFromMetadataGenerator((_, done) => {
        const metadata = new grpc.Metadata();
        metadata.add("authorization", `Bearer ${env.BERTH_TOKEN}`);
        done(null, metadata);
      }),
    );
  }
  return grpc.credentials.createSsl(read("BERTH_TLS_CA"), read("BERTH_TLS_KEY"), read("BERTH_TLS_CERT"));
}

export function stub(Service, address) {
  return new Service(address, credentials(), {
    "grpc.max_receive_message_length": 16 * 1024 * 1024,
    "grpc.max_send_message_length": 16 * 1024 * 1024,
  });
}

/** Stubs of every berth service, found from the cluster's address alone. */
export async function connect(clusterAddress) {
  const cluster = stub(api.berth.cluster.v1.ClusterService, clusterAddress);
  const { endpoints } = await unary(cluster, "GetEndpoints", {});
  const address = (kind) => {
    const found = endpoints.find((e) => e.kind === kind);
    if (!found) throw new Error(`no ${kind} endpoint in ${JSON.stringify(endpoints)}`);
    // A token caller has no client certificate: the public port is the one it can use.
    return process.env.BERTH_TOKEN ? found.public_address : found.address;
  };
  return {
    cluster,
    registry: stub(api.berth.registry.v1.RegistryService, address("ENDPOINT_KIND_REGISTRY")),
    image: stub(api.berth.image.v1.ImageService, address("ENDPOINT_KIND_IMAGE")),
    builder: stub(api.berth.builder.v1.BuilderService, address("ENDPOINT_KIND_BUILDER")),
  };
}

export const sha256 = (bytes) => "sha256:" + createHash("sha256").update(bytes).digest("hex");

/** A ustar archive of { name: Buffer | {data, mode} } entries, as `tar` would write it. */
export function tar(entries) {
  const blocks = [];
  for (const [name, entry] of Object.entries(entries)) {
    const data = Buffer.isBuffer(entry) ? entry : entry.data;
    const mode = Buffer.isBuffer(entry) ? 0o644 : entry.mode;
    const header = Buffer.alloc(512);
    header.write(name, 0, 100);
    header.write(mode.toString(8).padStart(7, "0") + "\0", 100);
    header.write("0000000\0", 108);
    header.write("0000000\0", 116);
    header.write(data.length.toString(8).padStart(11, "0") + "\0", 124);
    header.write(Math.floor(Date.now() / 1000).toString(8).padStart(11, "0") + "\0", 136);
    header.write("        ", 148); // checksum field counts as spaces while summing
    header.write("0", 156);
    header.write("ustar\0", 257);
    header.write("00", 263);
    let sum = 0;
    for (const byte of header) sum += byte;
    header.write(sum.toString(8).padStart(6, "0") + "\0 ", 148);
    blocks.push(header, data, Buffer.alloc((512 - (data.length % 512)) % 512));
  }
  blocks.push(Buffer.alloc(1024));
  return Buffer.concat(blocks);
}

export function gzip(bytes) {
  return new Promise((resolve, reject) => {
    const chunks = [];
    const z = createGzip();
    z.on("data", (c) => chunks.push(c));
    z.on("end", () => resolve(Buffer.concat(chunks)));
    z.on("error", reject);
    z.end(bytes);
  });
}

/** Split bytes into chunks of at most `size` (1 MiB by default). */
export function* chunks(bytes, size = 1024 * 1024) {
  for (let offset = 0; offset < bytes.length; offset += size) {
    yield bytes.subarray(offset, offset + size);
  }
}

export const sleep = (ms) => new Promise((r) => setTimeout(r, ms));
