r"""Zephyr's distilled recipe end to end on a CPU: a teacher, distilled SFT (dSFT) of a smaller student on the
teacher's answers, AI feedback (the teacher ranks four answers per prompt), distilled DPO (dDPO) from the dSFT
student, and an evaluation of dDPO against dSFT on held-out prompts, judged by the teacher.

  python -m train.pipeline --config=configs/zephyr_cpu.py --workdir=workdirs/zephyr_cpu

About 15 minutes on 2 cores; rerunning the command skips the stages done and resumes the one interrupted (a
training stage from its last checkpoint, a generation stage after its last prompt written). The report is
WORKDIR/report.md (the table below) and WORKDIR/report.png (the DPO metrics over steps). One stage's training
run is also an ordinary config, e.g. the dDPO student alone:

  python -m train --config=configs/zephyr_cpu.py:stage=ddpo --workdir=/tmp/ddpo \
      --config.init_params=workdirs/zephyr_cpu/dsft --config.data.files=workdirs/zephyr_cpu/pairs.jsonl

The stages (Tunstall et al. 2023, §3; every file in WORKDIR):
  prompts  seed_prompts, aif_prompts: first user turns of the embedded instruction set's train split (chat/stdlib,
           data/chat_data.py), disjoint; heldout_prompts: its validation and test splits (which no model trains on), and with their real
           answers, heldout_real.
  teacher  configs/mistral_sft.py's model (4 layers of width 128) trained on the embedded set's real answers.
  dsft_data  the teacher answers each seed prompt (temperature 0.7, top-p 0.95): chat JSONL.
  dsft     a student (3 layers of width 96) trained from scratch on dsft_data, assistant tokens only.
  cand_*   four answers per AIF prompt from four sources: the dSFT student at temperature 0.7 and 1.0, its
           checkpoint halfway through training at 0.7, and the teacher at 0.7 (Zephyr's "four models").
  pairs    the teacher judges them (its mean per-token log-likelihood of each answer: python -m train.judge);
           chosen = the best, rejected = a random other one (seeded); the scores beside them.
  ddpo     DPO from the dSFT student on the pairs (sigmoid loss, beta 0.1, the reference a frozen copy of the
           dSFT student); its eval split (the pairs' validation and test hashes) gives the held-out reward accuracy.
  answers_ddpo, answers_dsft, winrate: each student answers the held-out prompts; the teacher scores both.
  loss_*   held-out SFT loss: each model's loss on the real answers to the held-out prompts.
  report   win rate of dDPO over dSFT with its 95% interval, reward accuracy, losses, wall time per stage.

`:reference=precomputed` computes the reference's log-probabilities once before dDPO (python -m train.reference_logps)
instead of holding a frozen copy; `:tiny=True` shrinks every stage to a smoke test of the pipeline (a minute or two).
"""
import ml_collections

from configs import common, mistral_sft

STAGES = ('teacher', 'dsft', 'ddpo')


def _sizes(tiny: bool) -> dict:
  if tiny:
    return dict(seed=80, aif=48, heldout=8, teacher_steps=8, dsft_steps=8, ddpo_steps=12, new_tokens=24, seq_len=256)
  return dict(seed=512, aif=384, heldout=160, teacher_steps=250, dsft_steps=160, ddpo_steps=120, new_tokens=256,
              seq_len=512)


def get_config(arg=None):
  """One stage's training run: stage=teacher, dsft or ddpo (data.files and init_params are set by the pipeline)."""
  arg = common.parse_arg(arg, stage='ddpo', tiny=False, reference='frozen', ddpo_lr=2e-5)
  if arg.stage not in STAGES:
    raise ValueError(f'stage={arg.stage!r} is not a training stage of this pipeline; choose one of {list(STAGES)}.')
  size = _sizes(arg.tiny)
  c = mistral_sft.get_config(f'steps={size["teacher_steps"]}')
  c.data.seq_len = size['seq_len']
  c.checkpoint_every_steps = c.eval_every_steps = max(1, size['teacher_steps'] // 2)
  if arg.stage == 'teacher':
    return c
  # The student: smaller than the teacher, trained from scratch on the teacher's answers.
  c.model.update(embed_dim=96, num_layers=3, num_heads=4, num_kv_heads=2, head_dim=24, mlp_dim=256)
  steps = size['dsft_steps'] if arg.stage == 'dsft' else size['ddpo_steps']
  c.total_steps = steps
  c.checkpoint_every_steps = c.eval_every_steps = max(1, steps // 2)
  c.log_every_steps = max(1, steps // 20)
  c.schedule = common.schedule(base_learning_rate=1e-3, warmup_steps=max(1, steps // 10))
  if arg.stage == 'dsft':
    c.data.eval_split = 'validation+test'  # the teacher's answers to 10% of the seed prompts, by hash
    return c
  # dDPO (§4.4: beta 0.1, linear decay, 10% warmup, AdamW without weight decay). The paper's 5e-7 is for a 7B model
  # and would barely move this one in 120 steps; at 1e-4 (2.5 epochs of the pairs) the student over-optimises the
  # pairs: it learns them (held-out reward accuracy 0.78) but stops ending its answers and the teacher prefers the
  # dSFT student's (win rate 0.38); 2e-5 learns them as well (0.76) and wins (0.70).
  c.data = ml_collections.ConfigDict(dict(
      format='preference', files=common.optional(str, ''), on_bad_line='error', data_dir=common.optional(str),
      template='zephyr', tokenizer='bytes', max_length=size['seq_len'], max_prompt_length=size['seq_len'] // 2,
      train_split='train', eval_split='validation+test', num_threads=2, prefetch=2))
  c.task = ml_collections.ConfigDict(dict(name='preference', loss='sigmoid', beta=0.1, label_smoothing=0.0,
                                          reference=arg.reference))
  if arg.reference == 'frozen':
    c.frozen = ml_collections.ConfigDict({'reference': 'init'})
  else:
    c.data.ref_logps = common.optional(str, '')  # set by the pipeline
  c.model.embed_noise_alpha = 0.0
  c.schedule = common.schedule(base_learning_rate=arg.ddpo_lr, warmup_steps=max(1, steps // 10), decay='linear')
  c.eval_at_start = True
  return c


def _stage(name: str, kind: str, **fields) -> dict:
  return dict(name=name, kind=kind, **fields)


def _generate(name, workdir, prompts, source, temperature, size, step=None, seed=0):
  args = dict(workdir=workdir, prompts=prompts, num_samples=1, temperature=temperature, top_p=0.95, seed=seed,
              max_new_tokens=size['new_tokens'], source=source, batch_size=32)
  if step is not None:
    args['step'] = step
  return _stage(name, 'generate', args=args)


def get_pipeline(arg=None) -> list[dict]:
  """The stages in order; '{name}' in a value is stage `name`'s output (a workdir or a .jsonl file)."""
  arg = common.parse_arg(arg, tiny=False, reference='frozen', ddpo_lr=2e-5)
  size = _sizes(arg.tiny)
  this = f'configs/zephyr_cpu.py:tiny={arg.tiny},reference={arg.reference},ddpo_lr={arg.ddpo_lr}'
  heldout = _stage('heldout_prompts', 'prompts', dataset='chat/stdlib', split='validation+test', count=size['heldout'], offset=0,
                   answers=False)
  dsft_half = max(1, size['dsft_steps'] // 2)
  stages = [
      _stage('seed_prompts', 'prompts', dataset='chat/stdlib', split='train', count=size['seed'], offset=0,
             answers=False),
      _stage('aif_prompts', 'prompts', dataset='chat/stdlib', split='train', count=size['aif'], offset=size['seed'],
             answers=False),
      heldout,
      _stage('heldout_real', 'prompts', dataset='chat/stdlib', split='validation+test', count=size['heldout'], offset=0,
             answers=True),
      _stage('teacher', 'train', config=f'{this},stage=teacher'),
      _generate('dsft_data', '{teacher}', '{seed_prompts}', 'teacher', 0.7, size),
      _stage('dsft', 'train', config=f'{this},stage=dsft', set={'data.files': '{dsft_data}'}),
      _generate('cand_dsft_t07', '{dsft}', '{aif_prompts}', 'dsft_t0.7', 0.7, size, seed=1),
      _generate('cand_dsft_t10', '{dsft}', '{aif_prompts}', 'dsft_t1.0', 1.0, size, seed=2),
      _generate('cand_dsft_half', '{dsft}', '{aif_prompts}', f'dsft_step{dsft_half}_t0.7', 0.7, size,
                step=dsft_half, seed=3),
      _generate('cand_teacher', '{teacher}', '{aif_prompts}', 'teacher_t0.7', 0.7, size, seed=4),
      _stage('pairs', 'judge', args=dict(
          workdir='{teacher}', candidates='{cand_dsft_t07},{cand_dsft_t10},{cand_dsft_half},{cand_teacher}',
          method='loglik', seed=0)),
  ]
  ddpo_set = {'init_params': '{dsft}', 'data.files': '{pairs}'}
  if arg.reference == 'precomputed':
    stages.append(_stage('reference_logps', 'reference_logps', config=f'{this},stage=ddpo',
                         set={'init_params': '{dsft}', 'data.files': '{pairs}'}))
    ddpo_set['data.ref_logps'] = '{reference_logps}'
  stages += [
      _stage('ddpo', 'train', config=f'{this},stage=ddpo', set=ddpo_set),
      _generate('answers_ddpo', '{ddpo}', '{heldout_prompts}', 'ddpo', 0.7, size, seed=5),
      _generate('answers_dsft', '{dsft}', '{heldout_prompts}', 'dsft', 0.7, size, seed=5),
      _stage('winrate', 'judge', args=dict(workdir='{teacher}', candidates='{answers_ddpo},{answers_dsft}',
                                           method='loglik', seed=0)),
      _stage('loss_teacher', 'judge', args=dict(workdir='{teacher}', candidates='{heldout_real}', method='loglik')),
      _stage('loss_dsft', 'judge', args=dict(workdir='{dsft}', candidates='{heldout_real}', method='loglik')),
      _stage('loss_ddpo', 'judge', args=dict(workdir='{ddpo}', candidates='{heldout_real}', method='loglik')),
      _stage('report', 'report', win_rate=dict(scores='{winrate}', a='ddpo', b='dsft'), dpo_run='{ddpo}',
             sft_losses={'teacher': '{loss_teacher}', 'dSFT student': '{loss_dsft}', 'dDPO student': '{loss_ddpo}'},
             runs={'teacher': '{teacher}', 'dSFT student': '{dsft}', 'dDPO student': '{ddpo}'}, pairs='{pairs}',
             generated={'dSFT data (teacher)': ['{dsft_data}', '{seed_prompts}'],
                        'candidates: dSFT t=0.7': ['{cand_dsft_t07}', '{aif_prompts}'],
                        'candidates: dSFT t=1.0': ['{cand_dsft_t10}', '{aif_prompts}'],
                        'candidates: dSFT halfway': ['{cand_dsft_half}', '{aif_prompts}'],
                        'candidates: teacher': ['{cand_teacher}', '{aif_prompts}'],
                        'held-out answers: dDPO': ['{answers_ddpo}', '{heldout_prompts}'],
                        'held-out answers: dSFT': ['{answers_dsft}', '{heldout_prompts}']}),
  ]
  return stages
