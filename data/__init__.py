"""Input data: TFDS ArrayRecord sources read through grain, with numpy preprocessing; no TensorFlow.

  pipeline   get_source, make_train_iter, make_eval_iter
  image_ops  the preprocessing ops addressed by name in pp strings
  digits     the offline `digits` TFDS builder (registered when imported; `pipeline` imports it)
"""
