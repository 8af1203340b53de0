import * as grpc from '@grpc/grpc-js';
import * as protoLoader from '@grpc/proto-loader';
import { MAX_MESSAGE_BYTES, PROTO_PATH } from '../../proto/wire.ts';

/** The gRPC side of proto/stage.proto: the loaded Stage service and the channel settings every stage pair uses. */
export const channelOptions: grpc.ChannelOptions = {
  'grpc.max_receive_message_length': MAX_MESSAGE_BYTES,
  'grpc.max_send_message_length': MAX_MESSAGE_BYTES,
  'grpc.keepalive_time_ms': 10_000,
  'grpc.keepalive_timeout_ms': 5_000,
  'grpc.keepalive_permit_without_calls': 1,
  'grpc.http2.min_ping_interval_without_data_ms': 5_000,
};

const definition = protoLoader.loadSync(PROTO_PATH, { keepCase: true, longs: Number, enums: String, defaults: true, oneofs: false });
const pkg = grpc.loadPackageDefinition(definition) as unknown as { strata: { v1: { Stage: grpc.ServiceClientConstructor } } };

/** A request the protobuf decoder rejected: handlers answer INVALID_ARGUMENT instead of grpc-js' INTERNAL. */
export const MALFORMED = Symbol('malformed request');

/** What a server handler receives: the decoded message, or the decoder's complaint under MALFORMED. */
export type Received<T> = T & { [MALFORMED]?: string };

export const StageService: grpc.ServiceDefinition = Object.fromEntries(
  Object.entries(pkg.strata.v1.Stage.service).map(([name, m]) => [
    name,
    {
      ...m,
      requestDeserialize: (bytes: Buffer) => {
        try {
          return m.requestDeserialize(bytes);
        } catch (e) {
          return { [MALFORMED]: (e as Error).message };
        }
      },
    },
  ]),
);
export const StageClientCtor: grpc.ServiceClientConstructor = pkg.strata.v1.Stage;
