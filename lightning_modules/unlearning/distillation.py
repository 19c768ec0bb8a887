"""The LightningModules that the distillation methods train: a student and its frozen teachers."""

import pytorch_lightning as pl
import torch
from torch import Tensor, nn
from torch.optim.lr_scheduler import LambdaLR
from torch.utils.data import DataLoader
from typing_extensions import override

from delta_influence.unlearning import bad_teacher_loss, scrub_forget_loss, scrub_retain_loss


class FrozenTeachers(tuple):
    """Frozen teacher models, held outside the student's module tree: they stay in eval mode and out of its
    parameters, state dict and Lightning's check for modules left in eval mode at the start of training."""

    def __new__(cls, *teachers: nn.Module) -> "FrozenTeachers":
        for teacher in teachers:
            teacher.eval()
            teacher.requires_grad_(False)
        return super().__new__(cls, teachers)

    def to(self, device: torch.device) -> None:
        for teacher in self:
            teacher.to(device)


class ScrubModule(pl.LightningModule):
    """Student and frozen teacher (manual optimisation). The training loader is the retained set: each of its steps
    is a min-step; an epoch among the first ``forget_epochs`` begins with a pass of max-steps over ``forget`` at the
    rate ``forget_lr`` (the settings are ``SCRUB``'s)."""

    def __init__(
        self,
        student: nn.Module,
        teacher: nn.Module,
        forget: DataLoader,
        alpha: float,
        temperature: float,
        forget_epochs: int,
        lr: float,
        forget_lr: float,
        momentum: float,
        weight_decay: float,
        decay: bool,
    ) -> None:
        super().__init__()
        self.automatic_optimization = False
        self.student, self.forget = student, forget
        self.teachers = FrozenTeachers(teacher)
        self.alpha, self.temperature, self.forget_epochs = alpha, temperature, forget_epochs
        self.lr, self.forget_lr, self.momentum, self.weight_decay, self.decay = (
            lr,
            forget_lr,
            momentum,
            weight_decay,
            decay,
        )

    @property
    def teacher(self) -> nn.Module:
        return self.teachers[0]

    @override
    def on_fit_start(self) -> None:
        self.teachers.to(self.device)

    @override
    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        if batch_idx == 0 and self.current_epoch < self.forget_epochs:
            groups = self.optimizers().optimizer.param_groups
            rates = [group["lr"] for group in groups]
            for group in groups:  # the max-steps' own rate, decayed as far as the min-steps' is
                group["lr"] *= self.forget_lr / self.lr
            for inputs, _ in self.forget:
                inputs = inputs.to(self.device)
                with torch.no_grad():
                    teacher = self.teacher(inputs)
                self._step(scrub_forget_loss(self.student(inputs), teacher, self.temperature))
            for group, rate in zip(groups, rates):
                group["lr"] = rate
        inputs, labels = batch
        with torch.no_grad():  # without the divergence term (alpha 0) the teacher's pass is not needed
            teacher = self.teacher(inputs) if self.alpha else None
        loss = scrub_retain_loss(self.student(inputs), labels, teacher, self.alpha, self.temperature)
        self._step(loss)
        if self.decay:
            self.lr_schedulers().step()
        self.log("unlearn/scrub_loss", loss, prog_bar=True)

    def _step(self, loss: Tensor) -> None:
        optimizer = self.optimizers()
        optimizer.zero_grad()
        self.manual_backward(loss)
        optimizer.step()

    @override
    def configure_optimizers(self) -> dict:
        optimizer = torch.optim.SGD(
            self.student.parameters(), lr=self.lr, momentum=self.momentum, weight_decay=self.weight_decay
        )
        if not self.decay:
            return {"optimizer": optimizer}
        steps = max(int(self.trainer.estimated_stepping_batches), 1)  # the min-steps: the retained set's batches
        return {"optimizer": optimizer, "lr_scheduler": LambdaLR(optimizer, lambda step: max(0.0, 1 - step / steps))}


class BadTeacherModule(pl.LightningModule):
    """Student distilled from the competent teacher on retained and the random teacher on forget samples; batches
    are ``(inputs, labels, forget)``; Adam at ``lr``."""

    def __init__(self, student: nn.Module, good: nn.Module, bad: nn.Module, temperature: float, lr: float) -> None:
        super().__init__()
        self.student, self.temperature, self.lr = student, temperature, lr
        self.teachers = FrozenTeachers(good, bad)

    @override
    def on_fit_start(self) -> None:
        self.teachers.to(self.device)

    @override
    def training_step(self, batch: tuple[Tensor, Tensor, Tensor], batch_idx: int) -> Tensor:
        inputs, _, forget = batch
        with torch.no_grad():
            good, bad = self.teachers[0](inputs), self.teachers[1](inputs)
        loss = bad_teacher_loss(self.student(inputs), good, bad, forget.bool(), self.temperature)
        self.log("unlearn/bad_teacher_loss", loss, prog_bar=True)
        return loss

    @override
    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.student.parameters(), lr=self.lr)
