import * as grpc from '@grpc/grpc-js';
import { readFileSync } from 'node:fs';
import { StrataError } from '../../model/errors.ts';

/** PEM files for mutual TLS between the coordinator and the workers (and worker to worker). */
export interface TlsFiles {
  cert?: string;
  key?: string;
  ca?: string;
}

export interface Credentials {
  server: grpc.ServerCredentials;
  client: grpc.ChannelCredentials;
}

const read = (path: string, what: string) => {
  try {
    return readFileSync(path);
  } catch (e) {
    throw new StrataError('tls_file_unreadable', `cannot read the TLS ${what} ${path}: ${(e as Error).message}; make a dev CA with "strata certs --out DIR"`);
  }
};

/**
 * mTLS credentials when all three files are given (a worker then refuses peers without a certificate signed by the
 * CA); insecure credentials when none are; an error when only some are, so a half-configured cluster never runs
 * unauthenticated by accident.
 */
export function loadCredentials(files: TlsFiles): Credentials | undefined {
  const given = [files.cert, files.key, files.ca].filter(Boolean).length;
  if (given === 0) return undefined;
  if (given !== 3) throw new StrataError('tls_incomplete', 'mutual TLS needs --tls-cert, --tls-key and --tls-ca together (or STRATA_TLS_CERT/KEY/CA)');
  const cert = read(files.cert!, 'certificate');
  const key = read(files.key!, 'private key');
  const ca = read(files.ca!, 'CA certificate');
  return {
    server: grpc.ServerCredentials.createSsl(ca, [{ cert_chain: cert, private_key: key }], true),
    client: grpc.credentials.createSsl(ca, key, cert),
  };
}

export const tlsFromEnv = (o: { tlsCert?: string; tlsKey?: string; tlsCa?: string }): TlsFiles => ({
  cert: o.tlsCert ?? process.env.STRATA_TLS_CERT,
  key: o.tlsKey ?? process.env.STRATA_TLS_KEY,
  ca: o.tlsCa ?? process.env.STRATA_TLS_CA,
});
