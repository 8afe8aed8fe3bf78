package switchyard.example;

import java.nio.charset.StandardCharsets;
import java.nio.file.Path;
import java.time.Duration;
import java.util.Collection;
import java.util.LinkedHashMap;
import java.util.List;
import java.util.Map;
import java.util.Properties;
import org.apache.kafka.clients.consumer.ConsumerConfig;
import org.apache.kafka.clients.consumer.ConsumerRebalanceListener;
import org.apache.kafka.clients.consumer.ConsumerRecord;
import org.apache.kafka.clients.consumer.KafkaConsumer;
import org.apache.kafka.clients.producer.KafkaProducer;
import org.apache.kafka.clients.producer.ProducerConfig;
import org.apache.kafka.clients.producer.ProducerRecord;
import org.apache.kafka.common.TopicPartition;
import org.apache.kafka.common.errors.WakeupException;
import org.apache.kafka.common.header.Header;
import org.apache.kafka.common.header.internals.RecordHeaders;
import org.apache.kafka.common.serialization.ByteArrayDeserializer;
import org.apache.kafka.common.serialization.ByteArraySerializer;

/**
 * A Switchyard backend in Java with Apache's stock Kafka client (kafka-clients): no Switchyard
 * code.
 *
 * <p>It consumes a route's inbound topic ({@code <prefix>.in.<topic>}) as the consumer group
 * {@code <prefix>-<group>} and answers each client frame with {@code "java:"} + the frame on the
 * outbound topic ({@code <prefix>.out}), keyed by session, with the frame's {@code sy-opcode}:
 * a router delivers it to the right socket. Kafka keeps each session in one partition, so a
 * group of these processes keeps per-session order.
 *
 * <p>With {@code --hmac-key-file} (the file the edges get as {@code --identity-hmac-key-file})
 * every record's {@code sy-sig} is checked first; a record whose signature is missing or wrong
 * is logged on stderr, counted, and not answered.
 *
 * <p>Run with:
 *
 * <pre>
 *   scripts/build-examples     # or: cd examples/java-kafka-backend &amp;&amp; mvn -q -B package
 *   java -jar target/examples-build/switchyard-java-kafka-backend.jar --brokers 127.0.0.1:9092 --topic echo
 * </pre>
 *
 * <p>It prints one "ready" line on stdout once the group has given it partitions, and on SIGTERM
 * a last line on stderr: how many frames it answered and how many records it refused.
 */
public final class Backend {
  public static void main(String[] argv) throws Exception {
    Map<String, String> a = flags(argv, "Backend", Map.of(
        "--brokers", "127.0.0.1:9092", "--prefix", "sy", "--topic", "echo",
        "--group", "java-backend", "--hmac-key-file", ""), null);
    SySig sig = a.get("--hmac-key-file").isEmpty() ? null : verifier(a.get("--hmac-key-file"));
    String inbound = a.get("--prefix") + ".in." + a.get("--topic");
    String outbound = a.get("--prefix") + ".out";

    Properties c = new Properties();
    c.put(ConsumerConfig.BOOTSTRAP_SERVERS_CONFIG, a.get("--brokers"));
    c.put(ConsumerConfig.GROUP_ID_CONFIG, a.get("--prefix") + "-" + a.get("--group"));
    // A new group starts at the beginning: frames that arrived before the backend first
    // started are answered, not skipped.
    c.put(ConsumerConfig.AUTO_OFFSET_RESET_CONFIG, "earliest");
    // Notice a topic the edge creates after we subscribed within 2 s, not 5 min.
    c.put(ConsumerConfig.METADATA_MAX_AGE_CONFIG, "2000");
    c.put(ConsumerConfig.KEY_DESERIALIZER_CLASS_CONFIG, ByteArrayDeserializer.class.getName());
    c.put(ConsumerConfig.VALUE_DESERIALIZER_CLASS_CONFIG, ByteArrayDeserializer.class.getName());
    Properties p = new Properties();
    p.put(ProducerConfig.BOOTSTRAP_SERVERS_CONFIG, a.get("--brokers"));
    // Idempotent with acks=all (the defaults, written out): replies keep their order per
    // session. The default partitioner is murmur2 of the key, as Switchyard's.
    p.put(ProducerConfig.ENABLE_IDEMPOTENCE_CONFIG, "true");
    p.put(ProducerConfig.ACKS_CONFIG, "all");
    p.put(ProducerConfig.LINGER_MS_CONFIG, "1");
    p.put(ProducerConfig.KEY_SERIALIZER_CLASS_CONFIG, ByteArraySerializer.class.getName());
    p.put(ProducerConfig.VALUE_SERIALIZER_CLASS_CONFIG, ByteArraySerializer.class.getName());

    KafkaConsumer<byte[], byte[]> consumer = new KafkaConsumer<>(c);
    KafkaProducer<byte[], byte[]> producer = new KafkaProducer<>(p);
    Thread main = Thread.currentThread();
    Runtime.getRuntime().addShutdownHook(new Thread(() -> {
      consumer.wakeup();
      try {
        main.join(20_000);
      } catch (InterruptedException e) {
        Thread.currentThread().interrupt();
      }
    }));
    consumer.subscribe(List.of(inbound), new ConsumerRebalanceListener() {
      private boolean ready;

      @Override
      public void onPartitionsAssigned(Collection<TopicPartition> parts) {
        if (!ready && !parts.isEmpty()) {
          ready = true;
          System.out.println("java kafka backend ready on " + inbound + " (" + parts.size()
              + " partitions, group " + a.get("--prefix") + "-" + a.get("--group")
              + (sig == null ? ", signatures not checked)" : ", signatures checked)"));
          System.out.flush();
        }
      }

      @Override
      public void onPartitionsRevoked(Collection<TopicPartition> parts) {}
    });

    long answered = 0;
    long refused = 0;
    byte[] tag = "java:".getBytes(StandardCharsets.UTF_8);
    try {
      while (true) {
        for (ConsumerRecord<byte[], byte[]> r : consumer.poll(Duration.ofMillis(500))) {
          byte[] payload = r.value() == null ? new byte[0] : r.value();
          String why = sig == null ? null : sig.refusal(r.headers(), payload);
          String version = last(r, "sy-v");
          if (why == null && version != null && !version.equals("1")) {
            why = "contract version sy-v " + version + " is not 1";
          }
          if (why != null) {
            refused++;
            System.err.printf("refused %s record of session %s (seq %s, %s-%d@%d): %s; refused %d%n",
                last(r, "sy-kind"), last(r, "sy-session"), last(r, "sy-seq"), r.topic(),
                r.partition(), r.offset(), why, refused);
            continue;
          }
          if (!"frame".equals(last(r, "sy-kind"))) {
            continue; // connect / disconnect: a real backend would track sessions here
          }
          String session = last(r, "sy-session");
          byte[] key = r.key() != null ? r.key()
              : session != null ? session.getBytes(StandardCharsets.UTF_8) : null;
          if (key == null) {
            System.err.printf("a frame without a session at %s-%d@%d, skipped%n", r.topic(),
                r.partition(), r.offset());
            continue;
          }
          // A reply needs only key = session and the payload; the opcode keeps a binary frame
          // binary even when "java:" + its bytes happens to be UTF-8.
          RecordHeaders h = new RecordHeaders();
          h.add("sy-kind", "deliver".getBytes(StandardCharsets.UTF_8));
          String opcode = last(r, "sy-opcode");
          if (opcode != null) {
            h.add("sy-opcode", opcode.getBytes(StandardCharsets.UTF_8));
          }
          byte[] reply = new byte[tag.length + payload.length];
          System.arraycopy(tag, 0, reply, 0, tag.length);
          System.arraycopy(payload, 0, reply, tag.length, payload.length);
          producer.send(new ProducerRecord<>(outbound, null, key, reply, h), (md, e) -> {
            if (e != null) {
              System.err.println("reply to " + new String(key, StandardCharsets.UTF_8) + " failed: " + e);
            }
          });
          answered++;
        }
      }
    } catch (WakeupException stopping) {
      // SIGTERM: flush what was sent, leave the group.
    } finally {
      producer.close(Duration.ofSeconds(10));
      consumer.close(Duration.ofSeconds(10));
      System.err.printf("java kafka backend stopped: answered %d frames, refused %d records%n",
          answered, refused);
    }
  }

  /** The signature checker for the key in {@code file}; a key that cannot be read exits 64. */
  private static SySig verifier(String file) {
    try {
      return new SySig(SySig.readKeyFile(Path.of(file)));
    } catch (java.io.IOException e) {
      System.err.println("Backend: --hmac-key-file: " + e);
      System.exit(64);
      return null;
    }
  }

  /** The last value of header {@code name} (names compare case-insensitively), or null. */
  private static String last(ConsumerRecord<byte[], byte[]> r, String name) {
    String v = null;
    for (Header h : r.headers()) {
      if (h.key().equalsIgnoreCase(name)) {
        v = h.value() == null ? "" : new String(h.value(), StandardCharsets.UTF_8);
      }
    }
    return v;
  }

  /**
   * {@code --name value} flags over {@code defaults}; anything else goes to {@code positional}
   * when given, else it is a usage error (exit 64).
   */
  static Map<String, String> flags(String[] argv, String program, Map<String, String> defaults,
      List<String> positional) {
    Map<String, String> out = new LinkedHashMap<>(defaults);
    for (int i = 0; i < argv.length; i++) {
      String f = argv[i];
      if (defaults.containsKey(f) && i + 1 < argv.length) {
        out.put(f, argv[++i]);
      } else if (positional != null && !f.startsWith("--")) {
        positional.add(f);
      } else {
        System.err.println(program + ": unknown or incomplete flag " + f + "; flags (defaults): "
            + new java.util.TreeMap<>(defaults));
        System.exit(64);
      }
    }
    return out;
  }
}
