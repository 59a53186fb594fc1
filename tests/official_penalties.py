"""Test oracles: PyTorch transcriptions of the OFFICIAL code of six input-gradient regularizers and two
GAN gradient penalties, kept operation for operation (reductions, constants, detaches, which forward runs
in which mode), so that the fast versions in ``lfr_ext`` can be compared with them in fp64.

Every random draw of the official code is an explicit argument here (GradAlign's ``eta``, LLR's PGD start
``delta_init``, the Jacobian regularizer's projections ``v``, WGAN-GP's ``alpha``), so each oracle is a
deterministic function of its inputs. Each function returns ``PenaltyLoss(loss, data_loss, penalty)``:
``loss`` is the scalar TOTAL training loss as the official code builds it, ``data_loss`` the unweighted
data term (batch-mean cross-entropy unless said otherwise) and ``penalty`` the unweighted regularizer (what
the method's lambda multiplies); each docstring gives ``loss`` in terms of the two. Model modes: where
the official code runs the whole step in one mode, the caller sets it (``model.train()``/``model.eval()``)
and the docstring says which; where it switches mode inside a step (CURE) or uses BatchNorm semantics
torch has no mode for (LLR), the oracle does it and restores the model's state.

Repositories read (snapshot commits): adriarm/robustness_input_gradients@800ade9995d8,
dtak/adversarial-robustness-public@eb1e3af53017, F-Salehi/CURE_robustness@daeef24ea443,
LIONS-EPFL/ELLE@0f16c0e82ae4, tml-epfl/understanding-fast-adv-training@ceed49440bfc,
deepmind/local_linearity_regularizer@047175296149, deepmind/interval-bound-propagation@217a14d12686,
facebookresearch/jacobian_regularizer@32bb044c4c01, caogang/wgan-gp@ae47a185ed2e,
LMescheder/GAN_stability@c1f64c9efeac, NVlabs/stylegan2-ada-pytorch@d72cc7d041b4.
Paper values were NOT re-read for this file: every default below comes from the repositories (file:line);
"not stated" means the repository gives none for CIFAR-10.

Notation: B batch size, l_b the per-sample cross-entropy, g_b = grad_x l_b(x) (per-sample input gradient),
so the gradient of the batch-MEAN cross-entropy is g_b / B; norms are over all non-batch dims of one sample.

The table (one record per method; "yaml:115" = line 115 of that file in the repository named above it):

gradnorm -- Gradient Norm
  paper    A. Rodriguez-Munoz, T. Wang, A. Torralba, "Characterizing model robustness via natural input
           gradients", ECCV 2024.
  code     adriarm/robustness_input_gradients: input_norm_losses.py (class DBP),
           adversarial_training_cifar.py (train_one_epoch, lines 574-591), configs_cifar/gradnorm_prn18_gelu.yaml
  formula  loss = ce_w * CE + gn_w * alpha(t) * P,  CE = batch MEAN (timm SoftTargetCrossEntropy, mixup targets),
           P = (eps/std) * B * mean_b ||grad_x CE||_1 = (eps/std) * mean_b ||g_b||_1, the gradient taken w.r.t.
           the NORMALISED input; the whole step runs with model.eval() (script:528-529).
  CIFAR-10 ce_w = 0.8, gn_w = 1.2 (yaml:115-116); alpha(t) = clip(0.0 + 0.2 * (epoch + batch/len), 0, 1.0),
           i.e. 0 -> 1 over 5 epochs, per batch (yaml:117 "alpha: [0.0, 0.2, 1.0]", script:589);
           eps = 4/255 and std = 0.225, one scalar, not the per-channel data std (DBP defaults,
           input_norm_losses.py:13; DBP() is built without arguments, script:428); data normalised with
           ImageNet mean/std (yaml:64-65); mixup 0.8, cutmix 1.0, smoothing 0.1 (yaml:79-86); fine-tunes a
           naturally trained PreActResNet-18 (yaml:13); AdamW, wd 0.05, clip_grad 1.0, 300 epochs, batch 128
           (yaml:25-57); random_start off (argparse default, script:270).

igr -- Input-gradient regularization ("double backprop")
  paper    A. S. Ross, F. Doshi-Velez, "Improving the adversarial robustness and interpretability of deep
           neural networks by regularizing their input gradients", AAAI 2018.
  code     dtak/adversarial-robustness-public: adversarial_robustness/neural_network.py (loss_function,
           l2_double_backprop, l1_double_backprop, certainty_sensitivity), TensorFlow 1
  formula  loss = CE + lam * P, CE = batch MEAN softmax CE of one-hot labels;
           L2: P = tf.nn.l2_loss(grad_x CE) = sum_b ||g_b / B||^2 / 2 = sum_b ||g_b||^2 / (2 B^2)  (:157-159);
           L1: P = reduce_sum |grad_x CE| = mean_b ||g_b||_1  (:152-154);
           "certainty sensitivity": the same with uniform labels, its L1 with reduce_MEAN (:119-121);
           gradient of the cross-entropy, not of log p; training mode (is_train=True: BN batch stats, dropout).
  CIFAR-10 not stated (no CIFAR experiment). Sweep lam = logspace(2, 5, 13) = 1e2..1e5 at batch 256
           (scripts/train_all.py:28,52); the notebooks load MNIST lam = 10^4.75 = 56234 and SVHN lam = 1e4;
           Adam lr 2e-4, eps 1e-4, 15000 batches (train_all.py:27-31).

cure -- CURE (curvature regularization)
  paper    S.-M. Moosavi-Dezfooli, A. Fawzi, J. Uesato, P. Frossard, "Robustness via curvature regularization,
           and vice versa", CVPR 2019.
  code     F-Salehi/CURE_robustness: CURE/CURE.py (CURELearner._train, _find_z, regularizer); second reading
           LIONS-EPFL/ELLE core/utils/train.py (Trainer.loss, reg == 'CURE') -- a different variant, see
           cure_official.
  formula  loss = CE_train + sum_b(lam * ||d_b||_2) / B, d_b = g_b(x + z) - g_b(x) (per-sample: the official
           grad_outputs=ones(B) on a 0-d loss sums to a seed of B under torch 1.0.1), the L2 norm NOT squared;
           z = h (sign(g) + 1e-7) / (||sign(g)||_2 + 1e-7) per sample (= h sign(g) / sqrt(D)), detached;
           CE forward in TRAIN mode, the regularizer's forwards in EVAL mode (CURE.py:114, 187-188, 207-208).
  CIFAR-10 lam = 4 (CURELearner default, CURE.py:22; notebooks/example.ipynb uses lambda_=1); h = 3
           (train(h=[3]), CURE.py:76; the notebook ramps h = [0.1, 0.4, 0.8, 1.8, 3] over its 10 epochs); h is
           in NORMALISED-input units (utils/utils.py:31 normalises with CIFAR mean/std (0.2023, 0.1994,
           0.2010)): h = 3 is ~0.054 per coordinate normalised, ~2.8/255 in pixels; Adam lr 1e-4, fine-tuning a
           pretrained ResNet-18 (notebook).

gradalign -- GradAlign (with FGSM training)
  paper    M. Andriushchenko, N. Flammarion, "Understanding and improving fast adversarial training",
           NeurIPS 2020.
  code     tml-epfl/understanding-fast-adv-training: train.py (lines 141-202), utils.py (get_input_grad,
           get_uniform_delta, clamp, l2_norm_batch)
  formula  loss = CE(x + delta_fgsm) + lam * (1 - mean_b cos(g1_b, g2_b)); g1 = gradient at clamp(x + delta0,
           0, 1), DETACHED (it is the FGSM gradient, train.py:162); g2 = gradient at x + eta, eta ~ U[-eps, eps],
           no clamp, create_graph=True (train.py:193); samples where either gradient is zero are dropped from
           the mean (train.py:194); model.train() for the whole step (train.py:91).
  CIFAR-10 eps = 8/255 with lam = 0.2 (README.md:77, sh/exps_diff_eps_cifar10.sh:48); over eps,
           lam = 0.02 * 10^(eps_px / 8) (sh:40; 2.0 at 16/255, sh:56); attack_init zero (delta0 = 0) and
           fgsm_alpha = 1.25 (train.py:37), so the FGSM step is eps * sign(g1), clipped to the eps-ball and
           [0, 1]; 30 epochs, cyclic lr 0.30, batch 128, apex fp16 (sh:48). Inputs in [0, 1].

llr -- Local linearity regularization
  paper    C. Qin, J. Martens, S. Gowal, D. Krishnan, K. Dvijotham, A. Fawzi, S. De, R. Stanforth, P. Kohli,
           "Adversarial robustness through local linearization", NeurIPS 2019.
  code     deepmind/local_linearity_regularizer: regularizers.py (local_linearity), graph.py (_train_step),
           config.py, batchnorm.py; deepmind/interval-bound-propagation src/attacks.py (pgd_attack,
           UnrolledAdam); TensorFlow 1
  formula  loss = mean_b(nom_w * l_b) + l2_w * sum_W ||W||^2 / 2
                  + llr_w * mean_b(|l_b(x + d) - l_b(x) - d.g_b| + sf * |d.g_b|),
           d: 10 steps of PGD with an unrolled Adam (lr 0.1) minimising -mean_b |gap_b| from U[-eps, eps],
           projected to the eps-ball and [0, 1]; the attack's gradient ignores the linear term (d is
           stop-gradient'ed); the final term differentiates through g (double backprop); every regularizer
           forward normalises BN with the CLEAN batch's statistics and updates no moving average.
  CIFAR-10 llr_w (lambda) = 4, sf = 0.3, so mu = 4 * 0.3 = 1.2 (config.py:60,63); nom_w = 2
           (config.py:77; relative to the CE: lambda/2 = 2, mu/2 = 0.6); num_steps = 10 (config.py:66);
           eps = 8/255 (config.py:67), ramped linearly 0 -> 8/255 over the first 500 steps (config.py:69,
           graph.py:226); Adam beta1 0.9, beta2 0.999, eps 1e-9 (attacks.py:116); l2_w = 2e-4
           (config.py:76); adversarial_loss_weight 0; WRN-28-8 softplus (config.py:40-45); SGD momentum 0.9,
           lr 0.1 decayed x0.1 at 80k/88k/96k steps (config.py:48-53). Inputs in [0, 1].

jacobian -- Jacobian regularization
  paper    J. Hoffman, D. A. Roberts, S. Yaida, "Robust learning with Jacobian regularization",
           arXiv:1908.02729, 2019.
  code     facebookresearch/jacobian_regularizer: jacobian/jacobian.py (JacobianReg)
  formula  loss = CE + lam_JR * R, R = (1/2) sum_{i < n} C ||J^T v_i||_F^2 / (n B) (jacobian.py:56-57), J the
           Jacobian of the LOGITS, ||.||_F over the whole batch, v_i = randn(B, C) / ||.|| per row (unit norm,
           jacobian.py:67-70); n = -1: exact, one-hot v (R = ||J||_F^2 / (2B)).
  CIFAR-10 lam_JR not stated (README.md:35 example 0.01; examples/mnist.py:111 uses 0.1 on MNIST); n = 1
           (JacobianReg default; mnist.py:117).

wgan-gp -- WGAN gradient penalty (documented example)
  paper    I. Gulrajani, F. Ahmed, M. Arjovsky, V. Dumoulin, A. Courville, "Improved training of Wasserstein
           GANs", NeurIPS 2017.
  code     caogang/wgan-gp: gan_cifar10.py (calc_gradient_penalty, lines 116-137), a widely used PyTorch port
  formula  D_cost = D(fake).mean() - D(real).mean() + LAMBDA * mean_b (||grad_x D(x_hat_b)||_2 - 1)^2,
           x_hat = alpha real + (1 - alpha) fake, alpha ~ U[0, 1) per sample, real and fake detached.
  CIFAR-10 LAMBDA = 10 (gan_cifar10.py:30).

r1 -- R1 penalty (documented example)
  paper    L. Mescheder, A. Geiger, S. Nowozin, "Which training methods for GANs do actually converge?",
           ICML 2018.
  code     LMescheder/GAN_stability: gan_training/train.py (discriminator_trainstep, compute_grad2)
  formula  D loss = BCE(D(real), 1) + reg_param * mean_b ||grad_x D(real_b)||^2 (+ BCE(D(fake), 0)); no 1/2,
           so reg_param = gamma / 2 of the paper's R1 (stylegan2-ada training/loss.py:125-126 writes
           gamma / 2 * sum of squares).
  CIFAR-10 not stated (GAN_stability has no CIFAR config); reg_param = 10 (configs/default.yaml:21-22).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn


class PenaltyLoss(NamedTuple):
    """The total loss as the official code builds it, its data term and its unweighted regularizer."""

    loss: torch.Tensor
    data_loss: torch.Tensor
    penalty: torch.Tensor


class LLRLoss(NamedTuple):
    """LLR's total loss, data term (mean CE of the nominal forward), linearity loss and PGD's point."""

    loss: torch.Tensor
    data_loss: torch.Tensor
    penalty: torch.Tensor
    adv_x: torch.Tensor


def _soft_or_hard_ce(logits, y, reduction="mean"):
    """Cross-entropy with integer labels or with (B, C) target distributions (timm's SoftTargetCrossEntropy,
    TF's softmax_cross_entropy_with_logits on one-hot / soft labels)."""
    if y.dtype in (torch.int64, torch.int32, torch.int16, torch.uint8):
        return F.cross_entropy(logits, y, reduction=reduction)
    per_sample = torch.sum(-y * F.log_softmax(logits, dim=-1), dim=-1)
    return per_sample.mean() if reduction == "mean" else per_sample


def _one_hot_like(logits, y):
    if y.dtype in (torch.int64, torch.int32, torch.int16, torch.uint8):
        return F.one_hot(y.long(), logits.shape[-1]).to(logits.dtype)
    return y.to(logits.dtype)


# --------------------------------------------------------------------------------------------------
# 1. Gradient Norm (Rodriguez-Munoz, Wang, Torralba, ECCV 2024)
# --------------------------------------------------------------------------------------------------


def gradnorm_alpha(epoch, batch_idx, n_batches, *, alpha=(0.0, 0.2, 1.0), alpha_start_epoch=0.0, grad_accum=1):
    """The regularizer's ramp ``alpha(t)`` of adversarial_training_cifar.py:589 (train_one_epoch).

    ``alpha = max(0, min(a0 + ((epoch - start) + (batch_idx // accum) / (n_batches / accum)) * a1, a2))``
    with ``(a0, a1, a2) = (0.0, 0.2, 1.0)`` in configs_cifar/gradnorm_prn18_gelu.yaml:117: 0 -> 1 linearly
    over the first 5 epochs, per batch."""
    a0, a1, a2 = alpha
    progress = (epoch - alpha_start_epoch) + (batch_idx // grad_accum) / (n_batches / grad_accum)
    return max(0.0, min(a0 + progress * a1, a2))


def gradnorm_official(model, x, y, *, eps=4.0 / 255.0, std=0.225, ce_weight=0.8, gradnorm_weight=1.2, alpha=1.0):
    """Gradient-norm regularization, transcribed from adriarm/robustness_input_gradients:
    ``input_norm_losses.py`` (class ``DBP``, ``forward``) and ``adversarial_training_cifar.py``
    (``train_one_epoch``, the ``args.gradnorm`` branch, lines 574-591) with the CIFAR config
    ``configs_cifar/gradnorm_prn18_gelu.yaml``. Paper: A. Rodriguez-Munoz, T. Wang, A. Torralba,
    "Characterizing model robustness via natural input gradients", ECCV 2024.

    Official step::

        input.requires_grad_(True); output = model(input)
        ce_loss = loss_fn(output, target)              # SoftTargetCrossEntropy (mixup on): batch MEAN
        loss = ce_weight * ce_loss
        gradient = autograd.grad(ce_loss, input, create_graph=True, retain_graph=True)[0]
        loss_reg = (eps / std) * B * gradient.abs().sum((-3, -2, -1)).mean()      # DBP
        loss += gradnorm_weight * alpha * loss_reg

    Since ``gradient`` is the gradient of the batch MEAN, ``B * gradient`` is the per-sample gradient and
    ``penalty = (eps/std) * mean_b ||grad_x l_b||_1``. ``eps/std`` converts the pixel-space radius 4/255 to
    the normalised-input space with ONE scalar std 0.225 (not the per-channel data std); ``x`` is the
    NORMALISED input (the loader normalises with the ImageNet mean/std of the yaml). ``y``: integer labels
    or (B, C) soft targets (the official run uses mixup/cutmix targets with label smoothing 0.1).

    Mode: the official ``train_one_epoch`` calls ``model.eval()`` (line 529; ``model.train()`` is
    commented out on line 528), so BatchNorm uses its running statistics during GradNorm training. The
    caller sets ``model.eval()``. Inputs other than (B, C, H, W) are reduced over all non-batch dims (the
    official ``sum((-3, -2, -1))`` is the same thing for image batches).

    Returns ``PenaltyLoss(loss, data_loss=ce_loss, penalty=loss_reg)``,
    ``loss = ce_weight * data_loss + gradnorm_weight * alpha * penalty``.
    """
    x = x.detach().clone().requires_grad_(True)
    output = model(x)
    ce_loss = _soft_or_hard_ce(output, y)
    loss = ce_weight * ce_loss
    gradient = torch.autograd.grad(ce_loss, x, create_graph=True, retain_graph=True)[0]
    batch_size = gradient.shape[0]
    scale = eps / std
    per_sample_l1 = gradient.abs().sum((-3, -2, -1)) if gradient.dim() == 4 else gradient.abs().flatten(1).sum(1)
    loss_reg = scale * batch_size * per_sample_l1.mean()
    loss = loss + gradnorm_weight * alpha * loss_reg
    return PenaltyLoss(loss, ce_loss, loss_reg)


# --------------------------------------------------------------------------------------------------
# 2. Input-gradient regularization / double backprop (Ross & Doshi-Velez, AAAI 2018)
# --------------------------------------------------------------------------------------------------

IGR_VARIANTS = ("l2_double_backprop", "l1_double_backprop", "l2_certainty_sensitivity", "l1_certainty_sensitivity")


def igr_official(model, x, y, *, lam, variant="l2_double_backprop", softmax_temperature=1.0):
    """Input-gradient regularization ("double backprop"), transcribed from dtak/adversarial-robustness-public:
    ``adversarial_robustness/neural_network.py`` (``NeuralNetwork.loss_function``, ``cross_entropy_with``,
    ``cross_entropy_grads``, ``l2_double_backprop``, ``l1_double_backprop``, ``certainty_sensitivity``,
    ``l2_certainty_sensitivity``, ``l1_certainty_sensitivity``; TensorFlow 1). Paper: A. S. Ross,
    F. Doshi-Velez, "Improving the adversarial robustness and interpretability of deep neural networks by
    regularizing their input gradients", AAAI 2018.

    Official graph (``y`` one-hot)::

        cross_entropy = reduce_mean(softmax_cross_entropy_with_logits(logits, y))      # batch MEAN
        cross_entropy_grads = tf.gradients(cross_entropy, X)[0]                          # = g_b / B
        l2_double_backprop = tf.nn.l2_loss(cross_entropy_grads)                          # sum(t ** 2) / 2
        l1_double_backprop = reduce_sum(abs(cross_entropy_grads))
        certainty_sensitivity = tf.gradients(cross_entropy_with(ones / K), X)[0]         # uniform labels
        l2_certainty_sensitivity = tf.nn.l2_loss(certainty_sensitivity)
        l1_certainty_sensitivity = reduce_MEAN(abs(certainty_sensitivity))              # mean, not sum
        loss = log_likelihood + lam * <variant>       # log_likelihood = cross_entropy (T = 1)

    So the L2 penalty is ``sum_b ||g_b||^2 / (2 B^2)`` (batch-size dependent: the official lambdas,
    1e2..1e5 at batch 256, absorb the 1/B^2) and the L1 one ``mean_b ||g_b||_1``. The gradient is that
    of the cross-entropy (= -grad log p_y), not of the log-probabilities. With ``softmax_temperature !=
    1`` only the data term uses ``logits / T``; the penalty keeps the T = 1 cross-entropy, as officially.
    ``loss_function`` also sums several terms when several coefficients are positive, and has
    ``l1_weights``/``l2_weights`` terms the training scripts never set; one variant at a time here.

    Mode: ``fit_batches`` feeds ``is_train=True``: BatchNorm with batch statistics and dropout on, a single
    forward. The caller sets ``model.train()``.

    Returns ``PenaltyLoss(loss, data_loss=log_likelihood, penalty=<variant>)``, ``loss = data_loss + lam * penalty``.
    """
    if variant not in IGR_VARIANTS:
        raise ValueError(f"variant must be one of {IGR_VARIANTS}")
    x = x.detach().clone().requires_grad_(True)
    logits = model(x)
    labels = _one_hot_like(logits, y)
    cross_entropy = _soft_or_hard_ce(logits, labels)
    if softmax_temperature == 1:
        log_likelihood = cross_entropy
    else:
        log_likelihood = _soft_or_hard_ce(logits / softmax_temperature, labels)
    if variant.endswith("double_backprop"):
        grads = torch.autograd.grad(cross_entropy, x, create_graph=True)[0]
    else:
        uniform = torch.ones_like(labels) / labels.shape[-1]
        grads = torch.autograd.grad(_soft_or_hard_ce(logits, uniform), x, create_graph=True)[0]
    if variant == "l2_double_backprop" or variant == "l2_certainty_sensitivity":
        penalty = torch.sum(grads**2) / 2  # tf.nn.l2_loss
    elif variant == "l1_double_backprop":
        penalty = torch.sum(torch.abs(grads))
    else:
        penalty = torch.mean(torch.abs(grads))
    log_prior = 0 + lam * penalty
    return PenaltyLoss(log_likelihood + log_prior, log_likelihood, penalty)


# --------------------------------------------------------------------------------------------------
# 3. CURE (Moosavi-Dezfooli, Fawzi, Uesato, Frossard, CVPR 2019)
# --------------------------------------------------------------------------------------------------


def _cure_find_z(model, inputs, targets, h):
    """``CURELearner._find_z``. The official ``loss_z.backward(torch.ones(B))`` on a 0-d loss ran on
    torch 1.0.1 (requirements.txt), whose engine sums a gradient expandable to the output's shape
    (``sum_to``): the seed is B, so ``grad = B * grad(mean CE) = per-sample gradients``. Here the seed is
    passed as B directly (today's torch refuses the shape mismatch). The official second forward
    ``outputs = self.net.eval()(inputs)`` (unused, eval mode, so no side effect) is omitted."""
    batch_size = targets.size(0)
    inputs = inputs.detach().clone().requires_grad_(True)
    loss_z = F.cross_entropy(model(inputs), targets)
    grad = torch.autograd.grad(loss_z, inputs, grad_outputs=torch.tensor(float(batch_size), dtype=loss_z.dtype))[0]
    grad = grad.detach() + 0.0
    norm_grad = grad.norm().item()  # norm over the whole batch, logged only
    z = torch.sign(grad).detach() + 0.0
    z = 1.0 * h * (z + 1e-7) / (z.reshape(z.size(0), -1).norm(dim=1)[:, None, None, None] + 1e-7)
    return z, norm_grad


def cure_regularizer_official(model, x, y, *, h=3.0, lambda_=4.0):
    """CURE's regularizer, transcribed from F-Salehi/CURE_robustness: ``CURE/CURE.py``
    (``CURELearner._find_z`` and ``CURELearner.regularizer``). Paper: S.-M. Moosavi-Dezfooli, A. Fawzi,
    J. Uesato, P. Frossard, "Robustness via curvature regularization, and vice versa", CVPR 2019.

    Official::

        z = sign(grad_x sum_b l_b(x))                                   # detached (.data)
        z = h * (z + 1e-7) / (||z||_2 per sample + 1e-7)                # = h sign(g) / sqrt(D) if g has no zeros
        loss_pos, loss_orig = CE_mean(net.eval()(x + z)), CE_mean(net.eval()(x))
        grad_diff = autograd.grad(loss_pos - loss_orig, x, grad_outputs=ones(B), create_graph=True)[0]
        reg = grad_diff.reshape(B, -1).norm(dim=1)                      # per-sample L2 norm, NOT squared
        return torch.sum(lambda_ * reg) / B, norm_grad

    ``grad_outputs=ones(B)`` on a 0-d loss: under torch 1.0.1 the seed sums to B, so ``grad_diff`` is the
    per-sample difference ``g_b(x + z) - g_b(x)`` (seeded with B here). Both gradients carry
    ``create_graph``; only ``z`` is detached. The L2 norm has no epsilon (its gradient is NaN for a sample
    whose two gradients coincide), as officially. ``regularizer(..., lambda_=4)``'s own argument is
    ignored officially (it uses ``self.lambda_``); ``lambda_`` here is ``self.lambda_``. ``x`` must be 4-D.

    Mode: every forward of ``_find_z`` and ``regularizer`` calls ``self.net.eval()``; the caller sets
    ``model.eval()`` (or uses :func:`cure_official`, which switches as the official step does).

    Returns ``(reg_weighted, penalty, norm_grad)``: ``torch.sum(lambda_ * reg) / B`` (official order),
    ``torch.sum(reg) / B`` and the logged batch gradient norm.
    """
    z, norm_grad = _cure_find_z(model, x, y, h)
    inputs = x.detach().clone().requires_grad_(True)
    batch_size = inputs.size(0)
    outputs_pos = model(inputs + z)
    outputs_orig = model(inputs)
    loss_pos = F.cross_entropy(outputs_pos, y)
    loss_orig = F.cross_entropy(outputs_orig, y)
    seed = torch.tensor(float(batch_size), dtype=loss_pos.dtype)
    grad_diff = torch.autograd.grad(loss_pos - loss_orig, inputs, grad_outputs=seed, create_graph=True)[0]
    reg = grad_diff.reshape(grad_diff.size(0), -1).norm(dim=1)
    return torch.sum(lambda_ * reg) / float(batch_size), torch.sum(reg) / float(batch_size), norm_grad


def cure_official(model, x, y, *, h=3.0, lambda_=4.0):
    """One CURE training loss, as ``CURELearner._train`` builds it (F-Salehi/CURE_robustness
    ``CURE/CURE.py``, lines 112-119): ``outputs = self.net.train()(inputs)``, then the regularizer (three
    eval-mode forwards, :func:`cure_regularizer_official`), ``loss = criterion(outputs, targets) + regularizer``.

    Mode: the official code switches itself: TRAIN mode for the cross-entropy forward (BatchNorm batch
    statistics, running-stat update), EVAL mode for the regularizer's forwards, and leaves the network in
    eval mode until the next batch's ``net.train()``. Here the same switches are made and the model's
    original mode is restored on return.

    Second reading, NOT transcribed: LIONS-EPFL/ELLE ``core/utils/train.py`` (``Trainer.loss``, reg ==
    'CURE', line 351) re-implements "CURE" differently: the far point is the (noisy) FGSM point x_adv, not
    x + h sign(g)/sqrt(D); the penalty is ``((g(x) - g(x_adv)) ** 2).mean(0).sum()`` with g the gradient of
    the batch-MEAN CE (so sum_b ||d_b||^2 / B^3) and g(x) detached; train mode; lin_reg 1000 (8/255) and
    50000 (16/255) in scripts/run_CURE_cifar10.sh.

    Returns ``PenaltyLoss(loss, data_loss=CE of the train-mode forward, penalty=mean_b ||d_b||_2)``,
    ``loss = data_loss + sum_b(lambda_ * ||d_b||) / B``.
    """
    was_training = model.training
    try:
        model.train()
        outputs = model(x)
        model.eval()
        reg_weighted, penalty, _ = cure_regularizer_official(model, x, y, h=h, lambda_=lambda_)
        neg_log_likelihood = F.cross_entropy(outputs, y)
        loss = neg_log_likelihood + reg_weighted
    finally:
        model.train(was_training)
    return PenaltyLoss(loss, neg_log_likelihood, penalty)


# --------------------------------------------------------------------------------------------------
# 4. GradAlign (Andriushchenko & Flammarion, NeurIPS 2020)
# --------------------------------------------------------------------------------------------------


def _clamp_torch14(z, lo, hi):
    """``utils.clamp``: ``torch.max(torch.min(z, hi), lo)`` with the subgradient of torch 1.4 (the
    Dockerfile's version): ``min.other`` passes the gradient where ``z <= hi``, ``max.other`` where
    ``z > lo`` (today's torch halves it at ties). The value is ``clamp(z, lo, hi)``."""
    passes = (z > lo) & (z <= hi)
    return torch.where(passes, z, z.detach().clamp(lo, hi))


def gradalign_official(model, x, y, *, eps, lam, eta, delta_init=None, fgsm_alpha=1.25):
    """FGSM training with GradAlign, transcribed from tml-epfl/understanding-fast-adv-training: ``train.py``
    (the ``args.attack == 'fgsm'`` branch and the ``grad_align_cos_lambda`` block, lines 141-202) and
    ``utils.py`` (``get_input_grad``, ``get_uniform_delta``, ``clamp``, ``l2_norm_batch``). Paper:
    M. Andriushchenko, N. Flammarion, "Understanding and improving fast adversarial training", NeurIPS 2020.

    Official step (attack fgsm, fp32; the released runs add apex fp16, not transcribed)::

        delta = zeros (attack_init zero) or U[-eps, eps] (random); requires_grad
        loss = CE_mean(model(clamp(X + delta, 0, 1)))
        grad = autograd.grad(loss, delta, create_graph=double_bp)[0]; grad = grad.detach()   # g1, DETACHED
        delta = clamp(delta + fgsm_alpha * eps * sign(grad), -eps, eps); delta = clamp(X + delta, 0, 1) - X
        loss = CE_mean(model(X + delta.detach()))
        grad2 = get_input_grad(model, X, y, eps, delta_init='random_uniform', backprop=True)
              # model(X + eta), eta ~ U[-eps, eps], NO clamp to [0, 1]; create_graph=True
        keep = (||grad|| != 0) * (||grad2|| != 0)                       # per sample
        cos = sum(grad[keep]/||grad[keep]|| * grad2[keep]/||grad2[keep]||, (1, 2, 3))
        loss += lam * (1 - cos.mean())

    Only g2 carries the double-backprop graph; g1 is the FGSM gradient itself (at clamp(X + delta_init),
    i.e. at X for attack_init zero, at a random point for attack_init random), detached. Both are gradients
    of the batch MEAN (the cosine does not see the 1/B). ``eta`` (the official ``get_uniform_delta`` draw,
    shape of ``x``, U[-eps, eps]) and ``delta_init`` (None = attack_init zero; else a U[-eps, eps] draw) are
    arguments. The clamp's subgradient follows torch 1.4 (see :func:`_clamp_torch14`): a pixel exactly at
    0 gets no gradient in g1, so sign(g1) = 0 and FGSM leaves it. ``x`` in [0, 1], 4-D.

    Mode: ``model.train()`` for the whole step (train.py:91; the three forwards use batch statistics and
    update BatchNorm's running stats). The caller sets ``model.train()``.

    Returns ``PenaltyLoss(loss, data_loss=CE at X + delta, penalty=1 - cos.mean())``,
    ``loss = data_loss + lam * penalty`` (the official ``train_reg`` logs ``lam * penalty``).
    """
    double_bp = lam > 0
    if delta_init is None:
        delta = torch.zeros_like(x, requires_grad=True)
    else:
        delta = delta_init.detach().clone().requires_grad_(True)
    x_adv = _clamp_torch14(x + delta, 0.0, 1.0)
    output = model(x_adv)
    loss = F.cross_entropy(output, y)
    grad = torch.autograd.grad(loss, delta, create_graph=double_bp)[0]
    grad = grad.detach()
    argmax_delta = eps * torch.sign(grad)
    with torch.no_grad():
        delta_data = (delta.detach() + fgsm_alpha * argmax_delta).clamp(-eps, eps)
        delta_data = (x + delta_data).clamp(0.0, 1.0) - x
    delta = delta_data.detach()
    output = model(x + delta)
    loss = F.cross_entropy(output, y)
    ce = loss
    reg = torch.zeros((), dtype=loss.dtype, device=loss.device)
    penalty = torch.zeros((), dtype=loss.dtype, device=loss.device)
    if lam != 0.0:
        delta2 = eta.detach().clone().requires_grad_(True)
        loss2 = F.cross_entropy(model(x + delta2), y)
        grad2 = torch.autograd.grad(loss2, delta2, create_graph=True)[0]
        keep = ((grad**2).sum([1, 2, 3]) ** 0.5 != 0) * ((grad2**2).sum([1, 2, 3]) ** 0.5 != 0)
        grad1, grad2 = grad[keep], grad2[keep]
        grad1_norms = (grad1**2).sum([1, 2, 3]) ** 0.5
        grad2_norms = (grad2**2).sum([1, 2, 3]) ** 0.5
        grad1_normalized = grad1 / grad1_norms[:, None, None, None]
        grad2_normalized = grad2 / grad2_norms[:, None, None, None]
        cos = torch.sum(grad1_normalized * grad2_normalized, (1, 2, 3))
        penalty = 1.0 - cos.mean()
        reg = reg + lam * penalty
    loss = loss + reg
    return PenaltyLoss(loss, ce, penalty)


# --------------------------------------------------------------------------------------------------
# 5. LLR (Qin et al., NeurIPS 2019)
# --------------------------------------------------------------------------------------------------


class _LocalStatsBatchNorm:
    """The regularizer's BatchNorm of deepmind/local_linearity_regularizer ``batchnorm.py`` with
    ``is_training=False, test_local_stats=True``: in ``"get"`` mode a BatchNorm normalises with its own
    input's batch statistics (``var = E[x^2] - E[x]^2``, differentiable) and records them; in ``"set"``
    mode it normalises with the recorded ones (the CLEAN batch's), whatever its input. No running-stat
    update. Output as ``tf.nn.batch_normalization``: ``x * inv + (beta - mean * inv)``,
    ``inv = rsqrt(var + eps) * gamma``. Patches the instances' ``forward`` and restores it."""

    def __init__(self, model):
        self.bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
        self.stats = {}
        self.mode = "get"
        self.detach_stats = False

    def __enter__(self):
        for m in self.bns:
            if "forward" in m.__dict__:
                raise RuntimeError("BatchNorm module already has an instance-level forward")
            m.forward = self._make_forward(m)
        return self

    def __exit__(self, *exc):
        for m in self.bns:
            m.__dict__.pop("forward", None)
        return False

    def _make_forward(self, m):
        def forward(inp):
            dims = [0] + list(range(2, inp.dim()))
            if self.mode == "get":
                mean = inp.mean(dims)
                mean_square = (inp**2).mean(dims)
                var = mean_square - mean**2
                self.stats[m] = (mean, var)
            else:
                mean, var = self.stats[m]
                if self.detach_stats:
                    mean, var = mean.detach(), var.detach()
            shape = [1, -1] + [1] * (inp.dim() - 2)
            inv = torch.rsqrt(var + m.eps)
            if m.weight is not None:
                inv = inv * m.weight
            shift = (m.bias - mean * inv) if m.bias is not None else -mean * inv
            return inp * inv.view(shape) + shift.view(shape)

        return forward


def llr_epsilon(step, *, warm_start=500, epsilon=8.0 / 255.0):
    """``graph._linear_schedule(global_step, 0, warm_start, 0, epsilon)``: the LLR radius ramps linearly
    from 0 to 8/255 over the first 500 steps (config.py:67-69, graph.py:226-228)."""
    rate = (step - 0) / float(warm_start - 0)
    return min(max(rate * (epsilon - 0.0) + 0.0, 0.0), epsilon)


def _l2_regularization_loss(model, weight):
    """``regularizers.l2_regularization_loss``: ``weight * tf.nn.l2_loss(w)`` summed over the variables
    named ``/w`` (conv and linear kernels; no biases, no BatchNorm). Torch: Conv*/Linear ``.weight``."""
    if weight <= 0:
        return 0.0
    terms = [
        weight * (m.weight**2).sum() / 2
        for m in model.modules()
        if isinstance(m, (nn.Linear, nn.modules.conv._ConvNd)) and m.weight is not None and m.weight.requires_grad
    ]
    return sum(terms[1:], terms[0]) if terms else 0.0


def llr_official(
    model,
    x,
    y,
    *,
    delta_init,
    eps=8.0 / 255.0,
    num_steps=10,
    smoothing_factor=0.3,
    loss_weight=4.0,
    nominal_loss_weight=2.0,
    l2_regularizer_weight=0.0002,
    adam_lr=0.1,
    adam_beta1=0.9,
    adam_beta2=0.999,
    adam_epsilon=1e-9,
):
    """Local linearity regularization, transcribed from deepmind/local_linearity_regularizer:
    ``local_linearity_regularizer/regularizers.py`` (``local_linearity``, ``l2_regularization_loss``),
    ``graph.py`` (``_train_step``), ``config.py`` (``get_llr_config``, ``get_training_config``),
    ``batchnorm.py`` (``BatchNorm._build``), and deepmind/interval-bound-propagation
    ``interval_bound_propagation/src/attacks.py`` (``pgd_attack``, ``_project_perturbation``,
    ``UnrolledAdam``); TensorFlow 1. Paper: C. Qin, J. Martens, S. Gowal, D. Krishnan, K. Dvijotham,
    A. Fawzi, S. De, R. Stanforth, P. Kohli, "Adversarial robustness through local linearization",
    NeurIPS 2019.

    Official::

        logits = model(x, is_training=True, test_local_stats=True)       # nominal: batch stats, EMA update
        ce = sparse_softmax_ce(logits, y)                                  # per sample
        # local_linearity(model, x, y, epsilon, num_steps=10, smoothing_factor=0.3):
        loss_b = softmax_ce(model(x, is_training=False, test_local_stats=True, get_stats), one_hot(y))
        g = tf.gradients(loss_b, x)[0]                                     # = grad of sum_b loss_b
        loss_fn(x', stop_grad, add_extra):
            new_loss_b = softmax_ce(model(x', ..., set_stats), one_hot(y))  # CLEAN batch's BN stats
            d = stop_gradient(x' - x); dg_b = sum(d * (stop_gradient(g) if stop_grad else g))
            diff = new_loss_b - (loss_b + dg_b); a_b = sign(diff) * diff
            if add_extra: a_b += smoothing_factor * sign(dg_b) * dg_b
            return -mean(a_b)
        adv_x = pgd_attack(loss_fn, x, epsilon, num_steps, image_bounds=(0, 1), optimizer=UnrolledAdam(0.1))
        linearity_loss = -loss_fn(adv_x, stop_grad=False, add_extra=True)
        loss = mean(nominal_loss_weight * ce) + (l2_weight * sum l2_loss(W) + loss_weight * linearity_loss)

    PGD: start ``delta_init`` (the official ``tf.random_uniform(shape(x), -eps, eps)``; ``random_init=1``
    always uses it), projected: ``clip(p, -eps, eps)``, then ``clip(x + p, 0, 1) - x``; each step minimises
    ``loss_fn(x + p)`` (stop_grad=True, add_extra=False) with an unrolled Adam on ``p`` (lr 0.1, beta1
    0.9, beta2 0.999, epsilon 1e-9, bias-corrected, t from 1) then projects; no gradient flows through the
    loop. Since ``d`` is stop-gradient'ed, the attack's gradient sees only ``new_loss`` (not the linear
    term), and the final term keeps ``g`` with its graph (double backprop) while ``d`` is constant. The
    TF float32 cast of Adam's step counter is not reproduced (fp64 here).

    Modes: the nominal forward is the caller's (``model.train()``, the official is_training=True with
    batch statistics). Every regularizer forward uses, for each torch BatchNorm, the clean batch's
    statistics and updates nothing (see :class:`_LocalStatsBatchNorm`, patched in and removed here); other
    modules run in the caller's mode (the official WRN has no dropout). ``eps``: the official radius is
    scheduled (:func:`llr_epsilon`). ``x`` in [0, 1]; the model includes its input normalisation (the
    official ``model_with_preprocess``).

    Returns ``LLRLoss(loss, data_loss=mean CE of the nominal forward, penalty=linearity_loss, adv_x)``.
    """
    # Nominal (graph._train_step).
    logits = model(x)
    cross_entropy = F.cross_entropy(logits, y, reduction="none")

    with _LocalStatsBatchNorm(model) as bn:
        inputs = x.detach().clone().requires_grad_(True)
        bn.mode = "get"
        clean_logits = model(inputs)
        probs = F.one_hot(y, clean_logits.shape[-1]).to(clean_logits.dtype)
        loss = _soft_or_hard_ce(clean_logits, probs, reduction="none")
        loss_grad = torch.autograd.grad(loss.sum(), inputs, create_graph=True)[0]
        loss_grad_sg = loss_grad.detach()
        bn.mode = "set"
        reduce_dims = list(range(1, inputs.dim()))

        def loss_fn(new_inputs, stop_grad=True, add_extra=False, nominal_loss=loss):
            new_logits = model(new_inputs)
            new_loss = _soft_or_hard_ce(new_logits, probs, reduction="none")
            perturbation = (new_inputs - inputs).detach()
            delta_grad = torch.sum(perturbation * (loss_grad_sg if stop_grad else loss_grad), dim=reduce_dims)
            diff = new_loss - (nominal_loss + delta_grad)
            attack_loss = torch.sign(diff) * diff
            if add_extra:
                attack_loss = attack_loss + smoothing_factor * torch.sign(delta_grad) * delta_grad
            return -torch.mean(attack_loss)

        def project(perturbation):
            clipped = perturbation.clamp(-eps, eps)
            return (x.detach() + clipped).clamp(0.0, 1.0) - x.detach()

        # attacks.pgd_attack with UnrolledAdam; back_prop=False: the loop's graph is discarded.
        perturbation = project(delta_init.detach())
        m = torch.zeros_like(perturbation)
        u = torch.zeros_like(perturbation)
        bn.detach_stats = True
        for t in range(1, num_steps + 1):
            p = perturbation.detach().requires_grad_(True)
            attack_obj = loss_fn(x.detach() + p, stop_grad=True, add_extra=False, nominal_loss=loss.detach())
            g = torch.autograd.grad(attack_obj, p)[0]
            with torch.no_grad():
                m = adam_beta1 * m + (1.0 - adam_beta1) * g
                u = adam_beta2 * u + (1.0 - adam_beta2) * g * g
                m_hat = m / (1.0 - adam_beta1**t)
                u_hat = u / (1.0 - adam_beta2**t)
                new_p = p.detach() - adam_lr * m_hat / (torch.sqrt(u_hat) + adam_epsilon)
                perturbation = project(new_p)
        bn.detach_stats = False
        adv_x = (x.detach() + perturbation).detach()
        linearity_loss = -loss_fn(adv_x, stop_grad=False, add_extra=True)

    classification_loss = torch.mean(nominal_loss_weight * cross_entropy)
    regularization_loss = _l2_regularization_loss(model, l2_regularizer_weight) + loss_weight * linearity_loss
    total = classification_loss + regularization_loss
    return LLRLoss(total, cross_entropy.mean(), linearity_loss, adv_x)


# --------------------------------------------------------------------------------------------------
# 6. Jacobian regularization (Hoffman, Roberts, Yaida, 2019)
# --------------------------------------------------------------------------------------------------


def jacobian_reg_penalty_official(x, output, *, n=1, v=None):
    """``JacobianReg.forward`` of facebookresearch/jacobian_regularizer ``jacobian/jacobian.py``:
    ``R = (1/2) * sum_{ii < num_proj} C * ||dy/dx^T v_ii||_F^2 / (num_proj * B)``, the Frobenius norm
    taken over the whole batch (``torch.norm(Jv)``), ``create_graph=True``, ``retain_graph=True``.

    ``v``: the official draws, shape (n, B, C), each ``torch.randn(B, C)`` (standard normal); they are
    normalised here exactly as ``_random_vector`` does (``addcdiv(zeros, 1.0, v, ||v||_2 per row)``, so
    unit norm per sample, whatever its docstring says about C^(1/2)). ``n = -1``: the exact
    ``tr(J J^T)`` with one-hot ``v`` (``num_proj = C``), ``v`` ignored. ``C == 1``: ``v = ones(B)``.
    ``x`` must require grad and ``output`` (B, C) be computed from it."""
    batch, classes = output.shape
    num_proj = classes if n == -1 else n
    j2 = 0
    for ii in range(num_proj):
        if n == -1:
            vec = torch.zeros(batch, classes, dtype=output.dtype, device=output.device)
            vec[:, ii] = 1
        elif classes == 1:
            vec = torch.ones(batch, dtype=output.dtype, device=output.device)
        else:
            raw = v[ii].to(output.dtype)
            vnorm = torch.norm(raw, 2, 1, True)
            vec = torch.addcdiv(torch.zeros(batch, classes, dtype=raw.dtype, device=raw.device), raw, vnorm, value=1.0)
        flat_y = output.reshape(-1)
        flat_v = vec.reshape(-1)
        (jv,) = torch.autograd.grad(flat_y, x, flat_v, retain_graph=True, create_graph=True)
        j2 += classes * torch.norm(jv) ** 2 / (num_proj * batch)
    return (1 / 2) * j2


def jacobian_reg_official(model, x, y, *, lambda_jr, n=1, v=None):
    """Jacobian regularization as the README / ``examples/mnist.py`` training loop of
    facebookresearch/jacobian_regularizer uses it (``jacobian/jacobian.py``, class ``JacobianReg``):
    ``data.requires_grad = True; output = model(data); loss_super = CrossEntropyLoss()(output, target);
    R = reg(data, output); loss = loss_super + lambda_JR * R``. Paper: J. Hoffman, D. A. Roberts, S. Yaida,
    "Robust learning with Jacobian regularization", arXiv:1908.02729 (2019).

    The Jacobian is that of the LOGITS (the model output), not of the loss or the probabilities. ``v``:
    see :func:`jacobian_reg_penalty_official` (shape (n, B, C), raw ``randn`` draws). Mode: the example
    trains in the module's default (training) mode; the caller sets it.

    Returns ``PenaltyLoss(loss, data_loss=loss_super, penalty=R)``, ``loss = data_loss + lambda_jr * penalty``.
    """
    data = x.detach().clone().requires_grad_(True)
    output = model(data)
    loss_super = F.cross_entropy(output, y)
    reg = jacobian_reg_penalty_official(data, output, n=n, v=v)
    return PenaltyLoss(loss_super + lambda_jr * reg, loss_super, reg)


# --------------------------------------------------------------------------------------------------
# GAN penalties: WGAN-GP (Gulrajani et al., 2017) and R1 (Mescheder et al., 2018)
# --------------------------------------------------------------------------------------------------


def wgan_gp_official(critic, real, fake, *, alpha, lam=10.0):
    """The critic loss with gradient penalty of caogang/wgan-gp ``gan_cifar10.py``
    (``calc_gradient_penalty``, lines 116-137, and the critic step, lines 200-224), the widely used PyTorch
    port of I. Gulrajani, F. Ahmed, M. Arjovsky, V. Dumoulin, A. Courville, "Improved training of
    Wasserstein GANs", NeurIPS 2017.

    Official::

        alpha = torch.rand(B, 1).expand(B, numel / B).contiguous().view(real.shape)
        interpolates = alpha * real_data + (1 - alpha) * fake_data       # real_data, fake_data = .data (detached)
        gradients = autograd.grad(netD(interpolates), interpolates, grad_outputs=ones, create_graph=True,
                                  retain_graph=True, only_inputs=True)[0].view(B, -1)
        gradient_penalty = ((gradients.norm(2, dim=1) - 1) ** 2).mean() * LAMBDA
        D_cost = D_fake - D_real + gradient_penalty                      # D_x = netD(x).mean()

    ``alpha``: the official ``torch.rand(B, 1)`` draw, shape (B,) or (B, 1). The per-sample L2 norm has no
    epsilon. Mode: the critic has no BatchNorm (the paper's recommendation); the caller's mode.

    Returns ``PenaltyLoss(loss=D_cost, data_loss=D_fake - D_real, penalty=mean_b (||grad||_2 - 1)^2)``,
    ``loss = data_loss + penalty * lam``.
    """
    real_data, fake_data = real.detach(), fake.detach()
    batch = real_data.shape[0]
    a = alpha.reshape(batch, 1).to(real_data.dtype)
    a = a.expand(batch, real_data.nelement() // batch).contiguous().view(real_data.shape)
    interpolates = (a * real_data + (1 - a) * fake_data).detach().requires_grad_(True)
    disc_interpolates = critic(interpolates)
    gradients = torch.autograd.grad(
        outputs=disc_interpolates,
        inputs=interpolates,
        grad_outputs=torch.ones(
            disc_interpolates.size(), dtype=disc_interpolates.dtype, device=disc_interpolates.device
        ),
        create_graph=True,
        retain_graph=True,
        only_inputs=True,
    )[0]
    gradients = gradients.view(gradients.size(0), -1)
    penalty = ((gradients.norm(2, dim=1) - 1) ** 2).mean()
    gradient_penalty = penalty * lam
    d_real = critic(real_data).mean()
    d_fake = critic(fake_data).mean()
    return PenaltyLoss(d_fake - d_real + gradient_penalty, d_fake - d_real, penalty)


def r1_official(discriminator, x_real, *, reg_param=10.0, x_fake=None):
    """The discriminator loss with the R1 penalty of LMescheder/GAN_stability ``gan_training/train.py``
    (``Trainer.discriminator_trainstep`` with ``gan_type: standard``, ``reg_type: real``, and
    ``compute_grad2``). Paper: L. Mescheder, A. Geiger, S. Nowozin, "Which training methods for GANs do
    actually converge?", ICML 2018.

    Official::

        x_real.requires_grad_(); d_real = D(x_real, y)
        dloss_real = BCE_with_logits(d_real, 1)                          # mean
        reg = reg_param * compute_grad2(d_real, x_real).mean()           # grad of d_real.sum(), create_graph
        # compute_grad2 = per-sample sum of squared input-gradient entries
        d_fake = D(G(z).detach()); dloss_fake = BCE_with_logits(d_fake, 0)

    Each term is ``backward()``-ed separately (same parameter gradient as their sum). There is no 1/2:
    ``reg_param`` is the paper's gamma / 2 (NVlabs/stylegan2-ada-pytorch ``training/loss.py`` writes
    ``r1_grads.square().sum([1,2,3]) * (r1_gamma / 2)``). The class input ``y`` is the caller's: pass a
    closure. Mode: ``discriminator.train()`` (the caller sets it).

    Returns ``PenaltyLoss(loss=dloss_real + reg [+ dloss_fake], data_loss=dloss_real [+ dloss_fake],
    penalty=mean_b ||grad_x D||^2)``, ``loss = data_loss + reg_param * penalty``.
    """
    x_real = x_real.detach().clone().requires_grad_(True)
    d_real = discriminator(x_real)
    dloss_real = F.binary_cross_entropy_with_logits(d_real, torch.ones_like(d_real))
    grad_dout = torch.autograd.grad(outputs=d_real.sum(), inputs=x_real, create_graph=True, retain_graph=True)[0]
    grad2 = grad_dout.pow(2).view(x_real.size(0), -1).sum(1)
    penalty = grad2.mean()
    reg = reg_param * penalty
    dloss = dloss_real
    if x_fake is not None:
        d_fake = discriminator(x_fake.detach())
        dloss = dloss_real + F.binary_cross_entropy_with_logits(d_fake, torch.zeros_like(d_fake))
    return PenaltyLoss(dloss + reg, dloss, penalty)


__all__ = [
    "IGR_VARIANTS",
    "LLRLoss",
    "PenaltyLoss",
    "cure_official",
    "cure_regularizer_official",
    "gradalign_official",
    "gradnorm_alpha",
    "gradnorm_official",
    "igr_official",
    "jacobian_reg_official",
    "jacobian_reg_penalty_official",
    "llr_epsilon",
    "llr_official",
    "r1_official",
    "wgan_gp_official",
]
