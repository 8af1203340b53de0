#!/usr/bin/env node
// The `strata` entry point: load TypeScript through tsx, then dispatch (bin/main.ts).
import { register } from 'tsx/esm/api';

register();
await import('./main.ts');
