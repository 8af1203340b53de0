import type * as grpc from '@grpc/grpc-js';
import type { Transport } from '../link.ts';
import { StageClient } from './client.ts';
import { GrpcStageServer } from './server.ts';

/** Stages over gRPC (HTTP/2, protobuf), optionally with mutual TLS (tls.ts): strata's default transport. */
export const grpcTransport: Transport = {
  connect: (address, security) => new StageClient(address, security as grpc.ChannelCredentials | undefined),
  serve: (handler, security) => new GrpcStageServer(handler, security as grpc.ServerCredentials | undefined),
};

export { StageClient } from './client.ts';
export { GrpcStageServer } from './server.ts';
