// Worker-thread bootstrap: threads do not inherit the tsx loader that bin/strata.js registered.
import { register } from 'tsx/esm/api';

register();
await import('./stage-thread.ts');
