"""The ceiling: a Bottle app on xhs-server's own cheroot settings that does no work.

Every path answers a fixed JSON envelope (the size of a poll's answer);
`POST /read` first reads the whole body off the socket, as the real server
must before it can parse an upload. run.py starts it as
`python bench/ceiling.py --port 0` and reads the address it prints.
"""
import argparse
import os
import sys

import bottle

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import xhs_server  # noqa: E402  (for make_server: the same cheroot settings)

ENVELOPE = ('{"code":200,"msg":"查询成功","data":{"flag":false,"reason":"",'
            '"last_seen":"2026-12-03 17:00:00"},"note":{"flag":"如果为True 则异常"}}').encode('utf-8')

app = bottle.Bottle()


def envelope():
    bottle.response.content_type = 'application/json; charset=utf-8'
    return ENVELOPE


@app.route('/read', method='POST')
def read_body():
    """Take the body off the socket the way xhs_server.read_body does, then answer."""
    environ = bottle.request.environ
    length = int(environ.get('CONTENT_LENGTH') or 0)
    environ['wsgi.input'].read(length)
    return envelope()


@app.route('/', method='ANY')
@app.route('/<path:path>', method='ANY')
def fixed(path=''):
    return envelope()


def main():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument('--host', default='127.0.0.1')
    parser.add_argument('--port', type=int, default=0)
    args = parser.parse_args()
    # make_server's threads, timeout, backlog and limits; only the app differs.
    server = xhs_server.make_server(args.host, args.port)
    server.wsgi_app = app

    xhs_server.serve(server, lambda bind_addr: print('ceiling serving http://%s:%d/' % bind_addr[:2],
                                                       flush=True))


if __name__ == '__main__':
    main()
