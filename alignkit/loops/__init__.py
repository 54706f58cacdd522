"""Self-improvement data loops: stages that make a model's training data from its own outputs.

- `alignkit pairs` (pairs.py): preference pairs from the policy's samples (rejection-sampling pairs,
  self-generated best-vs-bottom pairs, best-vs-worst of N, refine's revisions), for `alignkit dpo`.
- `alignkit curriculum` (curriculum.py): the weakest prompt categories of an eval, new prompts for
  them, and pairs on those.
- `alignkit augment` (augment.py): new prompts from seed prompts, answered, de-duplicated and filtered
  for diversity.

Each writes a dataset in a schema the training stages read, with a card.json beside it. These are
stage modules (peers of train/, evaluate/, testtime/): they use the engines (generation, rewards)
and never another stage. Repeating rounds of sample -> pairs -> DPO lives above the stages, in
alignkit/rounds.py. This __init__ imports nothing, so importing one loop does not import the others.
"""
