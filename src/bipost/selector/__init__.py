"""Bilevel data selection: learn one weight per training row of a noisy dataset so that training on the
weighted data serves a trusted objective, then rank and filter the rows.

The problem (BiPOST / SEAL) is bilevel. With f_1 the loss on the trusted data (dataset_1, the upper
level), l_i(theta) the loss of row i of the noisy data (dataset_2, the lower level) and w(omega) the
row weights,

    min_omega  f_1(theta*(omega))   s.t.  theta*(omega) in argmin_theta  g(theta, omega),
    g(theta, omega) = mean_i w_i(omega) * l_i(theta).

The penalty method replaces it by one problem over (theta, omega) with a penalty weight
gamma = (1 - u) / u:

    min_{theta, omega}  u * f_1(theta) + (1 - u) * [ g(theta, omega) - min_theta' g(theta', omega) ]

What bipost optimizes (as the seeds do) is this *with the value-function term
min_theta' g(theta', omega) dropped* (a "TODO" in the original code), by alternating steps on
every optimizer step, both on the same pre-update forward:

* model:    theta <- theta - lr * grad_theta [ u * f_1(theta) + (1 - u) * mean_i w_i.detach() * l_i(theta) ]
* selector: omega <- Adam step on grad_omega  mean_i w_i(omega) * l_i.detach()

and u starts at lambda (``--lambd``, the first objective's weight) and drops by
``schedule.lambda_decay`` per epoch of the lower data, clamped at 0 (the penalty grows).

What the dropped term means. The selector step only lowers ``g``: under softmax (mean weight 1) it
moves weight from rows whose loss is currently above the weighted mean to rows below it; under
sigmoid every weight is pushed down and the ranking comes from how fast. It never sees f_1 (there
is no hypergradient d f_1 / d omega): the upper level shapes the selection only through the model
it co-trains — rows that contradict the trusted data stay hard for a model that is also fit to
dataset_1, so their loss stays high and their weight sinks. With the value-function term kept, the
selector gradient would be (Danskin) mean_i grad w_i(omega) * (l_i(theta) - l_i(theta*(omega))):
each row's current loss compared with the loss the best model for the weighted data reaches on it,
so a row that is hard for every model would not be penalized for being hard. Computing
theta*(omega) needs an inner solve per selector step, which the seeds (and bipost) leave out. The
weights are therefore a ranking by "loss the jointly trained model does not bring down" — what
filtering uses (keep the top rows, retrain on them).

Pieces: :mod:`~bipost.selector.weights` (logits, activations, Adam, state),
:mod:`~bipost.selector.hook` (the ``StepHook`` in the training loop), :mod:`~bipost.selector.outputs`
(weights files, summary), :mod:`~bipost.selector.filter` (keep the top rows of the original file).
The schedule is ``bipost.schedules.bilevel``. See docs/selector.md.
"""

from bipost.selector.filter import FilterResult, filter_rows, select_row_ids
from bipost.selector.hook import SelectorHook
from bipost.selector.outputs import read_weights, write_weights
from bipost.selector.weights import INIT, SelectorWeights, activate

__all__ = ["FilterResult", "INIT", "SelectorHook", "SelectorWeights", "activate", "filter_rows",
           "read_weights", "select_row_ids", "write_weights"]
