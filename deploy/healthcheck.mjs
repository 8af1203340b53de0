#!/usr/bin/env node
// Container health probe for strata: the image's HEALTHCHECK, the compose healthchecks, or by hand.
//
//   node deploy/healthcheck.mjs                          find the strata process in this container and probe it
//   node deploy/healthcheck.mjs grpc HOST:PORT [SERVICE]  grpc.health.v1 Check (a worker); healthy only on SERVING
//   node deploy/healthcheck.mjs http URL                  GET (the coordinator's /health); healthy only on 2xx
//
// gRPC goes over mutual TLS when the worker does: the --tls-cert/--tls-key/--tls-ca of the process found, else
// STRATA_TLS_CERT/KEY/CA (so the node certificate must also be valid for 127.0.0.1, as `strata certs` makes it).
//
// Exit 0 = healthy, 1 = unhealthy (Docker's convention); one line on stdout says why.
// A worker answers NOT_SERVING until a coordinator has assigned its block range and the stage is loaded, so
// "unhealthy" during start-up is expected: give it a start period long enough to build the stage graph.
// Plain .mjs on purpose: it runs without tsx, in well under a second.
import { readdirSync, readFileSync } from 'node:fs';
import { createRequire } from 'node:module';

const require = createRequire(import.meta.url);
// Probing 127.0.0.1 over TLS sets an IP as SNI server name; Node's DEP0123 warning about it is noise here.
process.noDeprecation = true;
const TIMEOUT_MS = Number(process.env.STRATA_HEALTHCHECK_TIMEOUT_MS ?? 3000);

const done = (ok, msg) => {
  process.stdout.write(`${ok ? 'healthy' : 'unhealthy'}: ${msg}\n`);
  process.exit(ok ? 0 : 1);
};

/** A wildcard bind address is probed on loopback. */
function probeHost(host) {
  if (!host || host === '0.0.0.0' || host === '*') return '127.0.0.1';
  if (host === '::' || host === '[::]') return '[::1]';
  return host;
}

function splitHostPort(address) {
  const i = address.lastIndexOf(':');
  if (i < 0) throw new Error(`"${address}" is not host:port`);
  return { host: address.slice(0, i), port: address.slice(i + 1) };
}

function grpcCheck(address, service = '', tls = {}) {
  const grpc = require('@grpc/grpc-js');
  const { service: healthService } = require('grpc-health-check');
  const Health = grpc.makeGenericClientConstructor(healthService, 'Health');
  const files = [tls.ca, tls.key, tls.cert];
  let creds = grpc.credentials.createInsecure();
  if (files.some(Boolean)) {
    if (!files.every(Boolean)) done(false, 'mutual TLS needs a certificate, a key and a CA (--tls-cert/--tls-key/--tls-ca or STRATA_TLS_*)');
    try {
      creds = grpc.credentials.createSsl(...files.map((f) => readFileSync(f)));
    } catch (e) {
      done(false, `TLS files: ${e.message}`);
    }
  }
  const client = new Health(address, creds);
  client.Check({ service }, { deadline: Date.now() + TIMEOUT_MS }, (err, res) => {
    client.close();
    if (err) return done(false, `grpc ${address}: ${err.details || err.message}`);
    const status = typeof res.status === 'number' ? ['UNKNOWN', 'SERVING', 'NOT_SERVING', 'SERVICE_UNKNOWN'][res.status] : res.status;
    done(status === 'SERVING', `grpc ${address} service "${service}": ${status}`);
  });
}

async function httpCheck(url) {
  try {
    const res = await fetch(url, { signal: AbortSignal.timeout(TIMEOUT_MS) });
    const body = (await res.text()).slice(0, 200).replace(/\s+/g, ' ');
    done(res.ok, `GET ${url}: ${res.status} ${body}`);
  } catch (e) {
    done(false, `GET ${url}: ${e.cause?.code ?? e.message}`);
  }
}

/** argv value of --name / --name=value, else undefined. */
function flag(argv, name) {
  for (let i = 0; i < argv.length; i++) {
    if (argv[i] === name) return argv[i + 1];
    if (argv[i].startsWith(`${name}=`)) return argv[i].slice(name.length + 1);
  }
  return undefined;
}

/** The strata process in this container (PID 1, or the child of an init such as `docker run --init`). */
function findStrata() {
  for (const pid of readdirSync('/proc').filter((d) => /^\d+$/.test(d)).sort((a, b) => a - b)) {
    let argv;
    try {
      argv = readFileSync(`/proc/${pid}/cmdline`, 'utf8').split('\0').filter(Boolean);
    } catch {
      continue;
    }
    const at = argv.findIndex((a) => /(^|\/)strata(\.js)?$/.test(a));
    if (at < 0) continue;
    const command = argv.slice(at + 1).find((a) => !a.startsWith('-'));
    let env = {};
    try {
      env = Object.fromEntries(readFileSync(`/proc/${pid}/environ`, 'utf8').split('\0').filter(Boolean).map((kv) => [kv.slice(0, kv.indexOf('=')), kv.slice(kv.indexOf('=') + 1)]));
    } catch {
      /* another user's process: flags only */
    }
    return { pid, command, args: argv.slice(at + 1), env };
  }
  return null;
}

const envTls = (env) => ({ cert: env.STRATA_TLS_CERT, key: env.STRATA_TLS_KEY, ca: env.STRATA_TLS_CA });
const [mode, target, extra] = process.argv.slice(2);
if (mode === 'grpc' && target) {
  grpcCheck(target, extra ?? '', envTls(process.env));
} else if (mode === 'http' && target) {
  await httpCheck(target);
} else if (mode === undefined) {
  const p = findStrata();
  if (!p) done(false, 'no strata process found in /proc');
  if (p.command === 'worker') {
    const listen = flag(p.args, '--listen') ?? p.env.STRATA_LISTEN;
    if (!listen) done(false, `worker pid ${p.pid} has no --listen`);
    const { host, port } = splitHostPort(listen);
    const env = { ...envTls(process.env), ...Object.fromEntries(Object.entries(envTls(p.env)).filter(([, v]) => v)) };
    const tls = { cert: flag(p.args, '--tls-cert') ?? env.cert, key: flag(p.args, '--tls-key') ?? env.key, ca: flag(p.args, '--tls-ca') ?? env.ca };
    grpcCheck(`${probeHost(host)}:${port}`, '', tls);
  } else if (p.command === 'coordinator' || p.command === 'up') {
    const port = flag(p.args, '--port') ?? p.env.STRATA_PORT ?? '8080';
    const host = probeHost(flag(p.args, '--host') ?? p.env.STRATA_HOST ?? '127.0.0.1');
    await httpCheck(`http://${host}:${port}/health`);
  } else {
    // One-shot commands (forward, generate, plan, …) have nothing to probe.
    done(true, `strata ${p.command ?? ''} (pid ${p.pid}) serves nothing`);
  }
} else {
  process.stderr.write('usage: healthcheck.mjs [grpc HOST:PORT [SERVICE] | http URL]\n');
  process.exit(2);
}
