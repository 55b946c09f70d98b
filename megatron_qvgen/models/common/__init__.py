"""Building blocks shared by the video models (Wan, CogVideoX).

- ``stage``: the pipeline-stage base (block range, replicated embedders, QAT scope, recompute, checkpoints);
- ``linears``: bf16/QAT linear classes and the column/row builders (every transformer linear);
- ``attention``: TP attention over [s, b, h] with swappable core and q/k norms;
- ``feedforward``: TP FFN; ``embeddings``: sinusoidal timestep features and 2-layer MLP embedders;
- ``adaln``: modulation and the TP/SP boundary of conditioning vectors;
- ``rope``: 3D rotary tables and their application; ``norms``: distributed RMSNorm, fp32 LayerNorm,
  per-head LayerNorm;
- ``pipeline``: stage layer split and the reductions of replicated parameters' gradients;
- ``sharded_state``: dist-checkpoint descriptions keyed by diffusers names;
- ``megatron_config``: the TransformerConfig a stage is built with.
"""
