"""The base of the project's ModelAdmins: Django's, with two holes closed that let a
crafted URL answer a 500 (nothing a client sends may)."""

from __future__ import annotations

from datetime import datetime, time

from django.contrib import admin
from django.contrib.admin.options import IncorrectLookupParameters
from django.core.exceptions import FieldDoesNotExist
from django.db import models
from django.utils import timezone
from django.utils.dateparse import parse_date, parse_datetime


class ModelAdmin(admin.ModelAdmin):
    def get_changelist_instance(self, request):
        # A filter the database cannot take (`?created_at__year=99999`: "year is out of
        # range") is an invalid lookup, which the changelist answers as Django answers
        # one it knows to be invalid: the list again, with ?e=1.
        try:
            return super().get_changelist_instance(request)
        except (ValueError, OverflowError) as exc:
            raise IncorrectLookupParameters(exc) from exc

    def get_changeform_initial_data(self, request):
        # An add page prefilled from its URL (`?effective_from=2026-12-31`): a date or
        # time given as text reached the form's split widgets as text, a 500. Read as a
        # date or time; one that cannot be read is left out.
        initial = super().get_changeform_initial_data(request)
        for name, value in list(initial.items()):
            if not isinstance(value, str):
                continue
            try:
                field = self.model._meta.get_field(name)
            except FieldDoesNotExist:  # not a field: left as Django leaves it
                continue
            if isinstance(field, models.DateTimeField):
                parsed = _datetime(value)
            elif isinstance(field, models.DateField):
                parsed = _quietly(parse_date, value)
            else:
                continue
            if parsed is None:
                del initial[name]
            else:
                initial[name] = parsed
        return initial


def _quietly(parse, value: str):
    try:
        return parse(value)
    except ValueError:
        return None


def _datetime(value: str) -> datetime | None:
    parsed = _quietly(parse_datetime, value)
    if parsed is None:
        day = _quietly(parse_date, value)
        if day is None:
            return None
        parsed = datetime.combine(day, time.min)
    try:
        if timezone.is_naive(parsed):
            parsed = timezone.make_aware(parsed)
        timezone.localtime(parsed)  # what the form's widget does with it
    except (ValueError, OverflowError):  # a year 1 or 9999 moved out of range
        return None
    return parsed
