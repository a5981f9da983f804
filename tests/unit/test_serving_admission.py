"""The large requests' places (admission.py): given in order of arrival, taken at once only when free and nobody
waits, passed on when a waiter is cancelled after being handed one, and given back once each."""

import asyncio

from kiln_serving.admission import Places


def test_places_are_given_in_order_of_arrival_and_taken_at_once_only_when_free() -> None:
    async def run() -> None:
        places = Places(1)
        assert places.take_now() and not places.take_now()
        order: list[str] = []

        async def waiter(name: str) -> None:
            async with places.held():
                order.append(name)
                await asyncio.sleep(0)

        tasks = [asyncio.create_task(waiter(name)) for name in "abc"]
        await asyncio.sleep(0)
        assert not places.take_now()  # others wait: a newcomer does not jump the queue
        places.give_back()
        await asyncio.gather(*tasks)
        assert order == ["a", "b", "c"]
        assert places.take_now() and not places.take_now()
        places.give_back()

    asyncio.run(run())


def test_a_waiter_cancelled_before_or_after_its_turn_leaves_the_place_to_the_next() -> None:
    async def run() -> None:
        places = Places(1)
        assert places.take_now()
        first, second = asyncio.create_task(places.take()), asyncio.create_task(places.take())
        await asyncio.sleep(0)
        first.cancel()  # before its turn: it leaves the queue
        await asyncio.sleep(0)
        places.give_back()  # to the second
        await second
        third = asyncio.create_task(places.take())
        await asyncio.sleep(0)
        places.give_back()  # handed to the third ...
        third.cancel()  # ... which is cancelled before it runs: the place is passed on, here freed
        await asyncio.gather(third, return_exceptions=True)
        assert places.take_now() and not places.take_now()

    asyncio.run(run())
