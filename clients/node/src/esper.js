'use strict';
// Esper gRPC clients for Node.js, built at run time from the same proto/esper/v1/*.proto files the
// Python servers are generated from (no generated JS is committed).
//
// Like the Python helpers in esper.serving.client: every call carries a deadline, and only calls
// marked idempotent are retried (on UNAVAILABLE / RESOURCE_EXHAUSTED / ABORTED, with jittered
// exponential backoff inside the deadline).

const crypto = require('node:crypto');
const fs = require('node:fs');
const path = require('node:path');
const grpc = require('@grpc/grpc-js');
const protoLoader = require('@grpc/proto-loader');

const DEFAULT_PROTO_ROOT = path.resolve(__dirname, '..', '..', '..', 'proto');
const MAX_MESSAGE_BYTES = 4 * 1024 * 1024;
const RETRYABLE = new Set([grpc.status.UNAVAILABLE, grpc.status.RESOURCE_EXHAUSTED, grpc.status.ABORTED]);

function loadEsperProtos(protoRoot = process.env.ESPER_PROTO_DIR || DEFAULT_PROTO_ROOT) {
  const dir = path.join(protoRoot, 'esper', 'v1');
  if (!fs.existsSync(dir)) {
    throw new Error(`no proto files at ${dir}; set ESPER_PROTO_DIR to the repository's proto/ directory`);
  }
  const files = fs.readdirSync(dir).filter((f) => f.endsWith('.proto')).map((f) => path.join('esper', 'v1', f));
  const definition = protoLoader.loadSync(files, {
    includeDirs: [protoRoot],
    keepCase: true, // field names exactly as in the .proto files (snake_case), like the Python code
    longs: String, // int64 as decimal strings: no precision loss
    enums: String,
    defaults: true,
    oneofs: true,
  });
  return grpc.loadPackageDefinition(definition).esper.v1;
}

function deadlineIn(seconds) {
  if (!(seconds > 0)) {
    throw new Error(`every call needs a deadline: timeout must be > 0 seconds, got ${seconds}`);
  }
  return new Date(Date.now() + seconds * 1000);
}

function sleep(ms) {
  return new Promise((resolve) => setTimeout(resolve, ms));
}

// One unary call as a promise. `idempotent` calls are retried within the same overall deadline.
async function unary(client, method, request, { timeout = 10, idempotent = false, maxAttempts = 4 } = {}) {
  const deadline = deadlineIn(timeout);
  for (let attempt = 1; ; attempt += 1) {
    try {
      return await new Promise((resolve, reject) => {
        client[method](request, { deadline }, (err, reply) => (err ? reject(err) : resolve(reply)));
      });
    } catch (err) {
      const retry = idempotent && attempt < maxAttempts && RETRYABLE.has(err.code);
      const backoffMs = Math.random() * Math.min(2000, 50 * 2 ** (attempt - 1));
      if (!retry || Date.now() + backoffMs >= deadline.getTime()) {
        throw err;
      }
      await sleep(backoffMs);
    }
  }
}

function makeClients(protos, addresses) {
  const options = {
    'grpc.max_send_message_length': MAX_MESSAGE_BYTES,
    'grpc.max_receive_message_length': MAX_MESSAGE_BYTES,
  };
  const creds = grpc.credentials.createInsecure();
  const clients = {};
  if (addresses.urza) clients.urza = new protos.UrzaService(addresses.urza, creds, options);
  if (addresses.tezzeret) clients.tezzeret = new protos.TezzeretService(addresses.tezzeret, creds, options);
  if (addresses.oona) clients.oona = new protos.OonaService(addresses.oona, creds, options);
  return clients;
}

const FINAL_JOB_STATES = new Set([
  'COMPILE_JOB_STATE_SUCCEEDED',
  'COMPILE_JOB_STATE_FAILED',
  'COMPILE_JOB_STATE_TIMED_OUT',
  'COMPILE_JOB_STATE_CANCELLED',
]);

// Follows WatchCompileJob until the job reaches a final state; returns the final CompileJob.
function watchCompileJob(tezzeret, jobId, timeoutSeconds) {
  return new Promise((resolve, reject) => {
    const call = tezzeret.WatchCompileJob({ job_id: jobId }, { deadline: deadlineIn(timeoutSeconds) });
    let last = null;
    let settled = false;
    call.on('data', (reply) => {
      last = reply.job;
      if (FINAL_JOB_STATES.has(last.state) && !settled) {
        settled = true;
        resolve(last);
        call.cancel();
      }
    });
    call.on('error', (err) => {
      if (!settled) {
        settled = true;
        reject(err);
      }
    });
    call.on('end', () => {
      if (!settled) {
        settled = true;
        if (last) resolve(last);
        else reject(new Error(`WatchCompileJob(${jobId}) ended without any job state`));
      }
    });
  });
}

// Streams an artifact, hashing as it goes; rejects on any SHA-256 or size mismatch.
function downloadArtifact(urza, kernelId, outPath, timeoutSeconds) {
  return new Promise((resolve, reject) => {
    const call = urza.DownloadArtifact({ kernel_id: kernelId, chunk_size: 0 }, { deadline: deadlineIn(timeoutSeconds) });
    const hash = crypto.createHash('sha256');
    const tmpPath = `${outPath}.part`;
    const out = fs.createWriteStream(tmpPath);
    let metadata = null;
    let received = 0;
    let failed = false;
    const fail = (err) => {
      if (failed) return;
      failed = true;
      call.cancel();
      out.destroy();
      fs.rmSync(tmpPath, { force: true });
      reject(err);
    };
    call.on('data', (reply) => {
      if (reply.content === 'metadata') {
        metadata = reply.metadata;
      } else if (reply.content === 'chunk') {
        if (metadata === null) {
          fail(new Error('DownloadArtifact sent bytes before its metadata message'));
          return;
        }
        hash.update(reply.chunk);
        received += reply.chunk.length;
        out.write(reply.chunk);
      }
    });
    call.on('error', fail);
    call.on('end', () => {
      if (failed) return;
      if (metadata === null) {
        fail(new Error(`DownloadArtifact(${kernelId}) sent no metadata`));
        return;
      }
      const digest = hash.digest('hex');
      if (digest !== metadata.sha256 || String(received) !== String(metadata.size_bytes)) {
        fail(new Error(`artifact ${kernelId} failed verification: got ${received} bytes with sha256 ${digest}, ` +
          `expected ${metadata.size_bytes} bytes with sha256 ${metadata.sha256}`));
        return;
      }
      out.end(() => {
        fs.renameSync(tmpPath, outPath);
        resolve({ metadata, sha256: digest, size: received });
      });
    });
  });
}

module.exports = {
  DEFAULT_PROTO_ROOT,
  FINAL_JOB_STATES,
  deadlineIn,
  downloadArtifact,
  grpc,
  loadEsperProtos,
  makeClients,
  unary,
  watchCompileJob,
};
