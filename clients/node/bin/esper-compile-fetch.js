#!/usr/bin/env node
'use strict';
// Registers a blueprint in Urza, asks Tezzeret to compile it, waits for the job, downloads the
// artifact from Urza and verifies its SHA-256. Prints one JSON line with the result on stdout.
//
//   node bin/esper-compile-fetch.js --urza HOST:PORT --tezzeret HOST:PORT --out FILE
//        [--blueprint spec.json] [--input-shape -1,16] [--timeout 300]
//
// Exit codes: 0 verified artifact written, 1 the job or a call failed, 2 bad usage.

const fs = require('node:fs');
const { loadEsperProtos, makeClients, unary, watchCompileJob, downloadArtifact } = require('../src/esper');

const DEFAULT_BLUEPRINT = {
  blueprint_id: 'node_client_adapter',
  version: 1,
  family: 'adapter',
  description: 'Low-rank adapter registered by the Node.js client: down to 8, ReLU, back up (zero-init).',
  input_kind: 'SEED_INPUT_KIND_FEATURES',
  layers: [
    { op: 'BLUEPRINT_OP_LINEAR', width: 8, bias: true },
    { op: 'BLUEPRINT_OP_RELU' },
    { op: 'BLUEPRINT_OP_LINEAR', width_multiplier: 1.0, bias: true, zero_init: true },
  ],
  tags: ['node-client'],
  min_chunk_size: 1,
};

function usage(message) {
  process.stderr.write(`esper-compile-fetch: ${message}\n` +
    'usage: esper-compile-fetch --urza HOST:PORT --tezzeret HOST:PORT --out FILE ' +
    '[--blueprint spec.json] [--input-shape -1,16] [--timeout SECONDS]\n');
  process.exit(2);
}

function parseArgs(argv) {
  const args = { inputShape: '-1,16', timeout: 300 };
  const names = { '--urza': 'urza', '--tezzeret': 'tezzeret', '--out': 'out', '--blueprint': 'blueprint',
    '--input-shape': 'inputShape', '--timeout': 'timeout' };
  for (let i = 0; i < argv.length; i += 2) {
    const key = names[argv[i]];
    if (!key) usage(`unknown option ${JSON.stringify(argv[i])}`);
    if (i + 1 >= argv.length) usage(`${argv[i]} needs a value`);
    args[key] = argv[i + 1];
  }
  for (const required of ['urza', 'tezzeret', 'out']) {
    if (!args[required]) usage(`--${required} is required`);
  }
  for (const name of ['urza', 'tezzeret']) {
    if (!/^[^:]+:\d{1,5}$/.test(args[name])) usage(`--${name} must be HOST:PORT, got ${JSON.stringify(args[name])}`);
  }
  const dims = args.inputShape.split(',').map((d) => Number(d.trim()));
  if (dims.length < 2 || dims.some((d) => !Number.isInteger(d)) || dims[0] !== -1 || dims.slice(1).some((d) => d <= 0)) {
    usage(`--input-shape must be -1 (dynamic batch) then positive sizes, e.g. -1,16; got ${JSON.stringify(args.inputShape)}`);
  }
  args.dims = dims;
  args.timeout = Number(args.timeout);
  if (!(args.timeout > 0)) usage('--timeout must be a positive number of seconds');
  return args;
}

async function main() {
  const args = parseArgs(process.argv.slice(2));
  const spec = args.blueprint ? JSON.parse(fs.readFileSync(args.blueprint, 'utf8')) : DEFAULT_BLUEPRINT;
  const protos = loadEsperProtos();
  const { urza, tezzeret } = makeClients(protos, { urza: args.urza, tezzeret: args.tezzeret });
  const started = Date.now();

  // Registering identical content again is a no-op on the server, so this call is idempotent.
  const registered = await unary(urza, 'RegisterBlueprint', { blueprint: spec }, { timeout: 30, idempotent: true });
  const blueprint = registered.blueprint;
  // Compile starts a job (the server dedupes identical requests, but we do not rely on it): no retry.
  const compiled = await unary(tezzeret, 'Compile', {
    blueprint_id: blueprint.blueprint_id,
    blueprint_version: blueprint.version,
    input_shape: { dims: args.dims },
    device: 'DEVICE_TYPE_CPU',
    dtype: 'D_TYPE_FLOAT32',
  }, { timeout: 30, idempotent: false });
  let job = compiled.job;
  const remaining = () => Math.max(1, args.timeout - (Date.now() - started) / 1000);
  if (!['COMPILE_JOB_STATE_SUCCEEDED', 'COMPILE_JOB_STATE_FAILED', 'COMPILE_JOB_STATE_TIMED_OUT',
    'COMPILE_JOB_STATE_CANCELLED'].includes(job.state)) {
    job = await watchCompileJob(tezzeret, job.job_id, remaining());
  }
  if (job.state !== 'COMPILE_JOB_STATE_SUCCEEDED') {
    throw new Error(`compile job ${job.job_id} ended ${job.state}: ${job.error || '(no reason given)'}`);
  }
  const artifact = await unary(urza, 'GetArtifact', { kernel_id: job.kernel_id }, { timeout: 30, idempotent: true });
  if (artifact.artifact.status !== 'ARTIFACT_STATUS_VALIDATED') {
    throw new Error(`artifact ${job.kernel_id} is ${artifact.artifact.status}, expected ARTIFACT_STATUS_VALIDATED`);
  }
  const download = await downloadArtifact(urza, job.kernel_id, args.out, remaining());
  process.stdout.write(`${JSON.stringify({
    blueprint_id: blueprint.blueprint_id,
    blueprint_created: registered.created,
    job_id: job.job_id,
    state: job.state,
    reused: job.reused,
    kernel_id: job.kernel_id,
    sha256: download.sha256,
    size_bytes: download.size,
    format: download.metadata.format,
    out: args.out,
    seconds: (Date.now() - started) / 1000,
  })}\n`);
  urza.close();
  tezzeret.close();
}

main().catch((err) => {
  const code = err.code !== undefined ? ` (gRPC status ${err.code})` : '';
  process.stderr.write(`esper-compile-fetch: ${err.details || err.message}${code}\n`);
  process.exit(1);
});
