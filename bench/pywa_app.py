"""The reference bot scenario on pywa 4.x (FastAPI), for bench/run.

Same behaviour as the wa-router routes of benches/load.rs: "hi" -> two
buttons, button "sales" -> text, a list reply -> text, other text -> echo.
Signature check on (validate_updates with app_secret). The Graph API is the
harness's mock: GRAPH_URL, APP_SECRET, PHONE_ID and PYWA_MODE (sync or
async) come from the environment; run it with uvicorn.
"""

import os

from fastapi import FastAPI

GRAPH = os.environ["GRAPH_URL"] + "/v25.0"
COMMON = dict(
    phone_id=os.environ["PHONE_ID"],
    token="bench-token",
    webhook_endpoint="/webhook",
    verify_token="bench",
    app_secret=os.environ["APP_SECRET"],
    validate_updates=True,
)

app = FastAPI()

if os.environ.get("PYWA_MODE", "sync") == "async":
    from pywa_async import WhatsApp, filters, types

    wa = WhatsApp(server=app, **COMMON)
    wa.api._session.base_url = GRAPH

    @wa.on_message(filters.text)
    async def on_text(_, msg):
        if msg.text.strip().lower() == "hi":
            await msg.reply_text(
                "Hi! What do you need?",
                buttons=[types.Button("Sales", "sales"), types.Button("Support", "support")],
            )
        else:
            await msg.reply_text(msg.text)

    @wa.on_callback_button()
    async def on_button(_, cb):
        if cb.data == "sales":
            await cb.reply_text("Sales will write to you shortly.")

    @wa.on_callback_selection()
    async def on_list(_, sel):
        await sel.reply_text(f"You picked {sel.title}.")

else:
    from pywa import WhatsApp, filters, types

    wa = WhatsApp(server=app, **COMMON)
    wa.api._session.base_url = GRAPH

    @wa.on_message(filters.text)
    def on_text(_, msg):
        if msg.text.strip().lower() == "hi":
            msg.reply_text(
                "Hi! What do you need?",
                buttons=[types.Button("Sales", "sales"), types.Button("Support", "support")],
            )
        else:
            msg.reply_text(msg.text)

    @wa.on_callback_button()
    def on_button(_, cb):
        if cb.data == "sales":
            cb.reply_text("Sales will write to you shortly.")

    @wa.on_callback_selection()
    def on_list(_, sel):
        sel.reply_text(f"You picked {sel.title}.")
