"""A literal transcription of the authors' released ``LFR_loss`` (Xu et al., ICIP 2020).

Kept operation for operation; the only changes are the ones needed to run anywhere and test:
the noise is drawn as ``torch.randn(shape)`` and moved to ``x``'s device (their ``.cuda()``),
the optimizer argument (only used for ``zero_grad``) and the debug prints are dropped.
The criterion is ``nn.CrossEntropyLoss()`` (batch mean), as in their code.
"""

import torch
from torch import nn


def authors_lfr_loss(
    model, x_natural, y, lambada, criterion=nn.CrossEntropyLoss(), step_size=0.007, epsilon=0.031, perturb_steps=7
):
    model.eval()
    x_adv = x_natural.detach() + 0.001 * torch.randn(x_natural.shape).to(x_natural.device).detach()
    x_adv = torch.clamp(x_adv, 0.0, 1.0)
    for _ in range(perturb_steps):
        x_adv.requires_grad_()
        with torch.enable_grad():
            loss_adv = criterion(model(x_adv), y)
        x_adv_gradient = torch.autograd.grad(loss_adv, x_adv, create_graph=True, retain_graph=True)
        with torch.enable_grad():
            loss_grad = torch.mean(torch.sum(torch.abs(x_adv_gradient[0]), dim=(1, 2, 3)))
        gradient_for_update = torch.autograd.grad(loss_grad, x_adv, create_graph=False)[0]
        x_adv = x_adv.detach() + step_size * torch.sign(gradient_for_update.detach())
        x_adv = torch.min(torch.max(x_adv, x_natural - epsilon), x_natural + epsilon)
        x_adv = torch.clamp(x_adv, 0.0, 1.0)
    model.train()
    loss_normal = criterion(model(x_natural), y)
    x_adv.requires_grad_()
    loss_adv = criterion(model(x_adv), y)
    x_adv_gradient = torch.autograd.grad(loss_adv, x_adv, create_graph=True, retain_graph=True)[0]
    loss_grad = torch.mean(torch.sum(torch.abs(x_adv_gradient), dim=(1, 2, 3)))
    loss_grad = loss_grad * x_adv.size(0)  # "multiply batch size": the mean per-sample penalty
    grad_part = lambada * loss_grad
    loss_adversarial = loss_normal + grad_part
    return loss_adversarial, loss_normal, loss_grad, grad_part
