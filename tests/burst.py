"""A courier-side burst in a process of its own: `python tests/burst.py PORT < messages`.

Reads JSON lines `[topic, payload]` from stdin and publishes them at QoS 1 as fast as
the broker takes them (up to 1000 unacknowledged), then exits 0 once the broker has
acknowledged every one: from then on they are the broker's, whatever courierd does.
In its own process so that the test's own threads and courierd do not slow it down.
"""

from __future__ import annotations

import json
import sys
from collections import deque

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion

WINDOW = 1000


def main() -> int:
    port = int(sys.argv[1])
    client = paho.Client(CallbackAPIVersion.VERSION2, client_id="burst", protocol=paho.MQTTv5)
    client.max_inflight_messages_set(WINDOW)
    client.connect("127.0.0.1", port)
    client.loop_start()
    sent: deque[paho.MQTTMessageInfo] = deque()
    for line in sys.stdin:
        topic, payload = json.loads(line)
        sent.append(client.publish(topic, json.dumps(payload).encode(), qos=1))
        if len(sent) > 2 * WINDOW:  # paho's own queue stays small
            sent.popleft().wait_for_publish(60)
    for info in sent:
        info.wait_for_publish(60)
    client.disconnect()
    client.loop_stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
