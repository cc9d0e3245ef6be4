"""Text similarity of the student's answers to the teacher's (the paper's BLEU / ROUGE / METEOR).

All from the reference libraries, nothing re-implemented:
* BLEU-1..4: `sacrebleu` corpus BLEU with `max_ngram_order` n (13a tokenisation, exponential
  smoothing), reported in [0, 1] (sacrebleu's score / 100);
* ROUGE-1/2/L: `rouge_score` with the Porter stemmer, F1 averaged over questions, plus ROUGE-1
  precision and recall (the paper quotes both);
* METEOR: `nltk.translate.meteor_score` averaged over questions, on lower-cased whitespace
  tokens. Its synonym stage needs the WordNet corpus, which is absent offline: then the variant is
  exact + Porter-stem matching only (`text/meteor_wordnet` = 0), a lower bound of full METEOR;
* `text/student_len`, `text/teacher_len`: mean answer length in words.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


class _NoWordNet:
    """Stands in for `nltk.corpus.wordnet` when its data is absent: no synonyms."""

    @staticmethod
    def synsets(*_args, **_kwargs):
        return []


def _wordnet():
    from nltk.corpus import wordnet

    try:
        wordnet.synsets("dog")
        return wordnet, True
    except LookupError:
        return _NoWordNet(), False


def text_metrics(student: Sequence[str], teacher: Sequence[str]) -> dict[str, float]:
    """student[i] is scored against the reference teacher[i]; returns flat `text/*` keys."""
    if len(student) != len(teacher):
        raise ValueError(f"text_metrics: {len(student)} student answers vs {len(teacher)} teacher answers")
    if not student:
        return {}
    import sacrebleu
    from nltk.translate.meteor_score import meteor_score
    from rouge_score import rouge_scorer

    out: dict[str, float] = {}
    for n in range(1, 5):
        bleu = sacrebleu.metrics.BLEU(max_ngram_order=n, effective_order=True)
        out[f"text/bleu{n}"] = bleu.corpus_score(list(student), [list(teacher)]).score / 100.0
    scorer = rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL"], use_stemmer=True)
    scores = [scorer.score(ref, hyp) for hyp, ref in zip(student, teacher)]
    for name in ("rouge1", "rouge2", "rougeL"):
        out[f"text/{name}"] = float(np.mean([s[name].fmeasure for s in scores]))
    out["text/rouge1_precision"] = float(np.mean([s["rouge1"].precision for s in scores]))
    out["text/rouge1_recall"] = float(np.mean([s["rouge1"].recall for s in scores]))
    wordnet, has_wordnet = _wordnet()
    out["text/meteor"] = float(np.mean([
        meteor_score([ref.lower().split()], hyp.lower().split(), wordnet=wordnet)
        for hyp, ref in zip(student, teacher)]))
    out["text/meteor_wordnet"] = float(has_wordnet)
    out["text/student_len"] = float(np.mean([len(s.split()) for s in student]))
    out["text/teacher_len"] = float(np.mean([len(t.split()) for t in teacher]))
    return out


__all__ = ["text_metrics"]
