import { Command } from 'commander';
import { registerPlanCommand } from './plan.ts';
import { registerRunCommands } from './run-commands.ts';
import { registerWorkerCommand } from './worker.ts';
import { registerServeCommands } from './serve.ts';
import { registerCertsCommand } from './certs.ts';
import { registerBenchCommand } from './bench.ts';
import { registerSubmitCommands } from './submit.ts';

/** `strata`: a thin dispatcher; each command lives in its own module. */
export function buildProgram(): Command {
  const program = new Command('strata')
    .description('Pipeline-parallel inference for Hugging Face transformers: stages over gRPC, requests through BullMQ')
    .showHelpAfterError();
  registerRunCommands(program);
  registerWorkerCommand(program);
  registerServeCommands(program);
  registerCertsCommand(program);
  registerPlanCommand(program);
  registerBenchCommand(program);
  registerSubmitCommands(program);
  return program;
}

const isEntry = process.argv[1] && /strata(\.js)?$|main\.ts$/.test(process.argv[1]);
if (isEntry) {
  await buildProgram().parseAsync(process.argv);
}
