"""iwp: an edge deployment compiler for LLaVA-OneVision with training-free visual-token pruning in the graph.

Public API:
    load(name, ...)                      -> Loaded (HF model, processor, spec)        iwp.zoo
    make_batch(loaded, image, prompt)    -> Batch (derived token positions)          iwp.inputs
    PrunedLlavaOnevision(loaded.model)   -> prefill / decode / generate              iwp.model
    make_method(name, **options)         -> a selection method (iwp, btp, ...)      iwp.plugins.visual_token_select
"""
