// Analyze one image with the brainscan gateway from Node (@grpc/grpc-js).
// Research use only. Not a medical device; not for diagnosis or treatment decisions.
//
//   node analyze.mjs HOST:PORT slice.png [TOKEN]     → one JSON line on stdout
import { readFileSync } from "node:fs";
import { fileURLToPath } from "node:url";
import grpc from "@grpc/grpc-js";
import protoLoader from "@grpc/proto-loader";

const PROTO = fileURLToPath(new URL("../../proto/brainscan/v1/brainscan.proto", import.meta.url));

// Without these options fields go missing silently: keepCase keeps the .proto's snake_case names
// (tumor_probability, not tumorProbability); defaults fills proto3's omitted zero values (frame 0,
// tumor_detected false) instead of undefined; longs turns uint64 (area_px) into a string, not a lossy number.
const definition = protoLoader.loadSync(PROTO, { keepCase: true, longs: String, enums: String, defaults: true, oneofs: true });
const { BrainScan } = grpc.loadPackageDefinition(definition).brainscan.v1;

const [address, path, token] = process.argv.slice(2);
if (!address || !path) {
  console.error("usage: node analyze.mjs HOST:PORT IMAGE [TOKEN]");
  process.exit(64);
}
const client = new BrainScan(address, grpc.credentials.createInsecure());
const metadata = new grpc.Metadata();
if (token) metadata.set("authorization", `Bearer ${token}`);
const deadline = new Date(Date.now() + 30_000); // always set one: without it an overloaded gateway refuses at once

// The callback has the answer; the status event that follows it has the trailing metadata (x-request-id).
let outcome;
const call = client.Analyze({ encoded: readFileSync(path), image_id: path }, metadata, { deadline }, (error, response) => {
  if (error) {
    // error.code is a grpc.status number; details is the gateway's message, naming the field or limit.
    outcome = { error: grpc.status[error.code], message: error.details };
    return;
  }
  const { label, tumor_probability, tumor_detected, image_width, image_height, segmentation, instances } = response;
  outcome = {
    label, tumor_probability, tumor_detected, image_width, image_height,
    segmentation_area_px: segmentation ? segmentation.area_px : null,
    instances: instances.length,
  };
});
call.on("status", (status) => {
  outcome.request_id = status.metadata.get("x-request-id")[0] ?? null;
  console.log(JSON.stringify(outcome));
  client.close();
  process.exitCode = outcome.error ? 2 : 0;
});
