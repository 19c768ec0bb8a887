"""The LightningModules that the distillation methods train: a student and its frozen teachers."""

from typing import TYPE_CHECKING

import pytorch_lightning as pl
import torch
from torch import Tensor, nn
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
    """Student and frozen teacher; one max-step and one min-step per training step (manual optimisation)."""

    def __init__(self, student: nn.Module, teacher: nn.Module, method: "SCRUB") -> None:
        super().__init__()
        self.automatic_optimization = False
        self.student, self.method = student, method
        self.teachers = FrozenTeachers(teacher)

    @property
    def teacher(self) -> nn.Module:
        return self.teachers[0]

    @override
    def on_fit_start(self) -> None:
        self.teachers.to(self.device)

    @override
    def training_step(self, batch: dict, batch_idx: int) -> None:
        optimizer = self.optimizers()
        method = self.method
        forget, _ = batch["forget"]
        with torch.no_grad():
            teacher_forget = self.teacher(forget)
        loss = scrub_forget_loss(self.student(forget), teacher_forget, method.temperature)
        optimizer.zero_grad()
        self.manual_backward(loss)
        optimizer.step()
        retain, labels = batch["retain"]
        with torch.no_grad():
            teacher_retain = self.teacher(retain)
        loss = scrub_retain_loss(self.student(retain), labels, teacher_retain, method.alpha, method.temperature)
        optimizer.zero_grad()
        self.manual_backward(loss)
        optimizer.step()

    @override
    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.student.parameters(), lr=self.method.lr, momentum=self.method.momentum)


class BadTeacherModule(pl.LightningModule):
    """Student distilled from the competent teacher on retained and the random teacher on forget samples."""

    def __init__(self, student: nn.Module, good: nn.Module, bad: nn.Module, method: "BadTeacher") -> None:
        super().__init__()
        self.student, self.method = student, method
        self.teachers = FrozenTeachers(good, bad)

    @override
    def on_fit_start(self) -> None:
        self.teachers.to(self.device)

    @override
    def training_step(self, batch: dict, batch_idx: int) -> Tensor:
        (retain, _), (forget, _) = batch["retain"], batch["forget"]
        inputs = torch.cat([retain, forget])
        is_forget = torch.cat([torch.zeros(len(retain)), torch.ones(len(forget))]).bool().to(inputs.device)
        with torch.no_grad():
            good, bad = self.teachers[0](inputs), self.teachers[1](inputs)
        return bad_teacher_loss(self.student(inputs), good, bad, is_forget, self.method.temperature)

    @override
    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.student.parameters(), lr=self.method.lr, momentum=self.method.momentum)
