"""The LightningModules that the distillation methods train: a student and its frozen teachers."""

from typing import TYPE_CHECKING

import pytorch_lightning as pl
import torch
from torch import Tensor, nn
from torch.optim.lr_scheduler import LambdaLR
from torch.utils.data import DataLoader
from typing_extensions import override

from delta_influence.unlearning import bad_teacher_loss, scrub_forget_loss, scrub_retain_loss

if TYPE_CHECKING:
    from lightning_modules.unlearning.methods import SCRUB, BadTeacher


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
    is a min-step; an epoch among the first ``forget_epochs`` begins with a pass of max-steps over ``forget``."""

    def __init__(self, student: nn.Module, teacher: nn.Module, method: "SCRUB", forget: DataLoader) -> None:
        super().__init__()
        self.automatic_optimization = False
        self.student, self.method, self.forget = student, method, forget
        self.teachers = FrozenTeachers(teacher)

    @property
    def teacher(self) -> nn.Module:
        return self.teachers[0]

    @override
    def on_fit_start(self) -> None:
        self.teachers.to(self.device)

    @override
    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        method = self.method
        if batch_idx == 0 and self.current_epoch < method.forget_epochs:
            groups = self.optimizers().optimizer.param_groups
            rates = [group["lr"] for group in groups]
            for group in groups:  # the max-steps' own rate, decayed as far as the min-steps' is
                group["lr"] *= method.forget_lr / method.lr
            for inputs, _ in self.forget:
                inputs = inputs.to(self.device)
                with torch.no_grad():
                    teacher = self.teacher(inputs)
                self._step(scrub_forget_loss(self.student(inputs), teacher, method.temperature))
            for group, rate in zip(groups, rates):
                group["lr"] = rate
        inputs, labels = batch
        with torch.no_grad():  # without the divergence term (alpha 0) the teacher's pass is not needed
            teacher = self.teacher(inputs) if method.alpha else None
        loss = scrub_retain_loss(self.student(inputs), labels, teacher, method.alpha, method.temperature)
        self._step(loss)
        if method.decay:
            self.lr_schedulers().step()
        self.log("unlearn/scrub_loss", loss, prog_bar=True)

    def _step(self, loss: Tensor) -> None:
        optimizer = self.optimizers()
        optimizer.zero_grad()
        self.manual_backward(loss)
        optimizer.step()

    @override
    def configure_optimizers(self) -> dict:
        method = self.method
        optimizer = torch.optim.SGD(
            self.student.parameters(), lr=method.lr, momentum=method.momentum, weight_decay=method.weight_decay
        )
        if not method.decay:
            return {"optimizer": optimizer}
        steps = max(int(self.trainer.estimated_stepping_batches), 1)  # the min-steps: the retained set's batches
        return {"optimizer": optimizer, "lr_scheduler": LambdaLR(optimizer, lambda step: max(0.0, 1 - step / steps))}


class BadTeacherModule(pl.LightningModule):
    """Student distilled from the competent teacher on retained and the random teacher on forget samples; batches
    are ``(inputs, labels, forget)``."""

    def __init__(self, student: nn.Module, good: nn.Module, bad: nn.Module, method: "BadTeacher") -> None:
        super().__init__()
        self.student, self.method = student, method
        self.teachers = FrozenTeachers(good, bad)

    @override
    def on_fit_start(self) -> None:
        self.teachers.to(self.device)

    @override
    def training_step(self, batch: tuple[Tensor, Tensor, Tensor], batch_idx: int) -> Tensor:
        inputs, _, forget = batch
        with torch.no_grad():
            good, bad = self.teachers[0](inputs), self.teachers[1](inputs)
        loss = bad_teacher_loss(self.student(inputs), good, bad, forget.bool(), self.method.temperature)
        self.log("unlearn/bad_teacher_loss", loss, prog_bar=True)
        return loss

    @override
    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.student.parameters(), lr=self.method.lr)
