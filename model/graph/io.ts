/** The I/O names of a stage graph: the contract between the builder, the executor and the wire. */
export const IO = {
  inputIds: 'input_ids',
  hiddenIn: 'hidden_states',
  hiddenOut: 'next_hidden_states',
  positionIds: 'position_ids',
  attentionMask: 'attention_mask',
  logitPositions: 'logits_positions',
  logits: 'logits',
  /** int64 [B, R]: each logit row's argmax (the greedy token), so a greedy step need not fetch the logits. */
  nextTokens: 'next_tokens',
  lastHidden: 'last_hidden_state',
  pastKey: (layer: number) => `past_key_${layer}`,
  pastValue: (layer: number) => `past_value_${layer}`,
  presentKey: (layer: number) => `present_key_${layer}`,
  presentValue: (layer: number) => `present_value_${layer}`,
} as const;
