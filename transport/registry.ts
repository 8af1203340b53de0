import { grpcTransport } from './grpc/index.ts';
import type { ClientSecurity, ServerSecurity, StageHandler, StageLink, StageServer, Transport } from './link.ts';

/**
 * The transports a stage address can name, by scheme: `grpc://host:port`, or a plain `host:port` for the default.
 * A new transport is one folder beside grpc/ and one entry here.
 */
const TRANSPORTS: Record<string, Transport> = {
  grpc: grpcTransport,
};
const DEFAULT_TRANSPORT = 'grpc';

/** The transport an address names and the address that transport is given (its scheme removed). */
export function transportFor(address: string): { transport: Transport; address: string } {
  const m = /^([a-z][a-z0-9+.-]*):\/\/(?!\/)(.*)$/.exec(address);
  // Only a registered scheme picks a transport: anything else (dns:///…, unix:///…) is the default's to read.
  if (m && Object.hasOwn(TRANSPORTS, m[1])) return { transport: TRANSPORTS[m[1]], address: m[2] };
  return { transport: TRANSPORTS[DEFAULT_TRANSPORT], address };
}

/** A link to the stage at `address`. */
export function connectStage(address: string, security?: ClientSecurity): StageLink {
  const t = transportFor(address);
  return t.transport.connect(t.address, security);
}

/** A server for `handler` on the transport `listen` names; call listen(address) on it with the same address. */
export function serveStage(listen: string, handler: StageHandler, security?: ServerSecurity): { server: StageServer; listen: string } {
  const t = transportFor(listen);
  return { server: t.transport.serve(handler, security), listen: t.address };
}
