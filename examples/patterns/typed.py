"""Typed payloads: declare the payload as a ``msgspec.Struct``; qflow validates it before it is stored.

    python -m examples.patterns.typed

The annotation ``job: qflow.Job[Order]`` is the contract. ``add()`` checks every payload against it (and
refuses with ``qflow.PayloadError`` before writing anything), the worker decodes straight into ``Order``,
and ``processor.add(...)`` is checked by mypy/pyright. Results come back as plain data (msgpack), so
turn them back into a type with ``msgspec.convert``.

Evolving a payload type while old jobs are still queued: add fields with defaults; do not rename or retype
existing ones in one deploy.
"""

from __future__ import annotations

import asyncio
from typing import Literal

import msgspec

import qflow

app = qflow.App()
orders = app.queue("patterns-typed")


class Line(msgspec.Struct, frozen=True):
    sku: str
    quantity: int
    unit_cents: int


class Order(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    order_id: int
    lines: list[Line]
    shipping: Literal["standard", "express"] = (
        "standard"  # added later, with a default: old jobs still decode
    )


class Invoice(msgspec.Struct, frozen=True):
    order_id: int
    total_cents: int


@orders.processor(concurrency=10)
async def invoice(job: qflow.Job[Order]) -> Invoice:
    order = job.payload  # an Order, already validated
    extra = 1500 if order.shipping == "express" else 0
    return Invoice(order.order_id, sum(line.quantity * line.unit_cents for line in order.lines) + extra)


async def main() -> None:
    async with app:
        order = Order(order_id=1042, lines=[Line("mug", 2, 1250), Line("tea", 1, 899)], shipping="express")
        job = await invoice.add(order)  # typed: mypy rejects invoice.add("not an order")
        by_name = await orders.add(
            "invoice", {"order_id": 1043, "lines": [{"sku": "pot", "quantity": 1, "unit_cents": 3900}]}
        )

        for bad in (
            {"order_id": "1044", "lines": []},  # wrong type
            {"order_id": 1045, "lines": [], "coupon": "FREE"},  # unknown field
            {"order_id": 1046, "lines": [], "shipping": "drone"},  # not one of the allowed values
        ):
            try:
                await orders.add("invoice", bad)
            except qflow.PayloadError as exc:
                print("refused:", str(exc).split(": ", 1)[1])

        await app.run_worker(burst=True)
        for handle in (job, by_name):
            result = msgspec.convert(await handle.result(timeout=1), Invoice)
            print(f"order {result.order_id}: {result.total_cents / 100:.2f} total")


if __name__ == "__main__":
    asyncio.run(main())
