import type { Command } from 'commander';

export function registerPlanCommand(program: Command): void {
  program.command('plan').description('print the partition plan for a model over a set of workers (not yet implemented)');
}
