"""The labeling server: a Gradio app over the label store, behind a front door that checks every request.

`app.py` wires the page to the plain handlers of `handlers.py`; `guard.py` is the front door, `render.py`
the HTML an annotator sees, `page.js` the page's script, `users.py` the users file, `cli.py` the
`alignkit label ...` commands and `simulate.py` annotators that vote through the server's API.
"""
