r"""The PyTorch side of a benchmark, in a process of its own (one that has never run JAX).

The JAX benchmarks start it as `python -m benchmarks.torch_peer JOB.json` and read the last line it prints,
a JSON object of seconds. A job names the peer (`timm:NAME`, `hf_vit`, `hf_mistral`), what to time
(`train`: forward + backward + AdamW; `infer`: eval forward under inference_mode; `generate`: HF greedy
`generate`), the model's shape and an .npz batch written by the parent, so both sides see the same numbers.
"""
import json
import statistics
import sys
import time

import numpy as np
import torch


def _build(job: dict) -> torch.nn.Module:
  spec = job['spec']
  if spec.startswith('timm:'):
    import timm
    kwargs = dict(pretrained=False, num_classes=job['num_classes'], in_chans=job['channels'])
    try:  # transformers fix their input size at construction; convnets take none
      return timm.create_model(spec[5:], img_size=job['image_size'], **kwargs)
    except TypeError:
      return timm.create_model(spec[5:], **kwargs)
  import transformers
  if spec == 'hf_mistral':
    return transformers.MistralForCausalLM(transformers.MistralConfig(**job['hf_config'],
                                                                      attn_implementation='sdpa'))
  if spec == 'hf_vit':
    d = job['vit_dims']
    return transformers.ViTForImageClassification(transformers.ViTConfig(
        hidden_size=d['width'], num_hidden_layers=d['depth'], num_attention_heads=d['num_heads'],
        intermediate_size=d['mlp_dim'], patch_size=d['patch_size'], image_size=job['image_size'],
        num_channels=job['channels'], num_labels=job['num_classes'], attn_implementation='eager'))
  raise SystemExit(f'error: unknown reference {spec!r}: use timm:MODEL_NAME, hf_vit or hf_mistral.')


def _timed(fn, repeats: int) -> list[float]:
  fn()  # warm-up: allocator, lazy init
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    fn()
    times.append(time.perf_counter() - start)
  return times


def run(job: dict) -> dict:
  torch.manual_seed(0)
  if job.get('threads'):
    torch.set_num_threads(job['threads'])
  net = _build(job)
  batch = dict(np.load(job['batch']))
  if job['mode'] == 'generate':
    net.eval()
    prompt = torch.from_numpy(batch['prompt']).long()
    n = job['max_new_tokens']

    def call():  # greedy; min_new_tokens keeps a random model from stopping at its EOS id
      with torch.inference_mode():
        out = net.generate(prompt, max_new_tokens=n, min_new_tokens=n, do_sample=False,
                           attention_mask=torch.ones_like(prompt), pad_token_id=0)
      assert out.shape[1] == prompt.shape[1] + n, out.shape

    return {'times': _timed(call, job['repeats'])}
  if 'tokens' in batch:
    tokens = torch.from_numpy(batch['tokens']).long()
    forward = lambda: net(input_ids=tokens).logits
    loss_of = lambda: net(input_ids=tokens, labels=tokens).loss  # shifted next-token cross-entropy
  else:
    images = torch.from_numpy(batch['image']).permute(0, 3, 1, 2).contiguous()
    labels = torch.from_numpy(batch['label']).long()

    def forward():
      out = net(images)
      return out.logits if hasattr(out, 'logits') else out

    loss_of = lambda: torch.nn.functional.cross_entropy(forward(), labels)
  if job['mode'] == 'infer':
    net.eval()

    def call():
      with torch.inference_mode():
        forward()

    return {'times': _timed(call, job['repeats'])}
  net.train()
  optimizer = torch.optim.AdamW(net.parameters(), lr=1e-4)

  def step():
    optimizer.zero_grad(set_to_none=True)
    loss_of().backward()
    optimizer.step()

  return {'times': _timed(step, job['repeats'])}


def main() -> None:
  if len(sys.argv) != 2:
    raise SystemExit('usage: python -m benchmarks.torch_peer JOB.json')
  with open(sys.argv[1]) as f:
    job = json.load(f)
  result = run(job)
  result['median'] = statistics.median(result['times'])
  result['torch'] = torch.__version__
  print(json.dumps(result))


if __name__ == '__main__':
  main()
