package switchyard.example;

import java.nio.charset.StandardCharsets;
import java.util.ArrayList;
import java.util.List;
import java.util.Map;
import java.util.Optional;
import java.util.Properties;
import java.util.concurrent.ExecutionException;
import org.apache.kafka.clients.admin.Admin;
import org.apache.kafka.clients.admin.AdminClientConfig;
import org.apache.kafka.clients.admin.NewTopic;
import org.apache.kafka.clients.producer.KafkaProducer;
import org.apache.kafka.clients.producer.ProducerConfig;
import org.apache.kafka.clients.producer.ProducerRecord;
import org.apache.kafka.clients.producer.RecordMetadata;
import org.apache.kafka.common.errors.TopicExistsException;
import org.apache.kafka.common.serialization.ByteArraySerializer;
import org.apache.kafka.common.utils.Utils;

/**
 * Where Java's default partitioner puts each session: for every session id given, a record
 * keyed by it is produced to {@code --topic} (created with {@code --partitions} partitions) with
 * the producer's default partitioner, and one line is printed:
 * {@code <session> <partition the broker acknowledged> <toPositive(murmur2(key)) % n>}.
 * Exits 1 if the two ever differ. The test suite compares them with where the edge put the same
 * sessions (tests/stock_backends.rs).
 *
 * <p>Run with:
 *
 * <pre>
 *   java -cp target/examples-build/switchyard-java-kafka-backend.jar switchyard.example.Partition \
 *     --brokers 127.0.0.1:9092 --topic parity --partitions 16 01JD3M6W8Y6QX0S5Q5T3B0Z8C4 ...
 * </pre>
 */
public final class Partition {
  public static void main(String[] argv) throws Exception {
    List<String> sessions = new ArrayList<>();
    Map<String, String> a = Backend.flags(argv, "Partition", Map.of(
        "--brokers", "127.0.0.1:9092", "--topic", "switchyard-parity", "--partitions", "16"),
        sessions);
    String topic = a.get("--topic");
    int n = Integer.parseInt(a.get("--partitions"));
    try (Admin admin = Admin.create(Map.of(AdminClientConfig.BOOTSTRAP_SERVERS_CONFIG, a.get("--brokers")))) {
      admin.createTopics(List.of(new NewTopic(topic, Optional.of(n), Optional.empty()))).all().get();
    } catch (ExecutionException e) {
      if (!(e.getCause() instanceof TopicExistsException)) {
        throw e;
      }
    }
    Properties p = new Properties();
    p.put(ProducerConfig.BOOTSTRAP_SERVERS_CONFIG, a.get("--brokers"));
    p.put(ProducerConfig.KEY_SERIALIZER_CLASS_CONFIG, ByteArraySerializer.class.getName());
    p.put(ProducerConfig.VALUE_SERIALIZER_CLASS_CONFIG, ByteArraySerializer.class.getName());
    boolean agree = true;
    try (KafkaProducer<byte[], byte[]> producer = new KafkaProducer<>(p)) {
      // A new topic may show fewer partitions for a moment; the default partitioner uses the
      // count in the producer's metadata, so wait for all of them.
      long deadline = System.currentTimeMillis() + 30_000;
      while (producer.partitionsFor(topic).size() != n) {
        if (System.currentTimeMillis() > deadline) {
          throw new IllegalStateException(topic + " does not have " + n + " partitions");
        }
        Thread.sleep(100);
      }
      for (String s : sessions) {
        byte[] key = s.getBytes(StandardCharsets.UTF_8);
        RecordMetadata md = producer.send(new ProducerRecord<>(topic, key, new byte[0])).get();
        int hashed = Utils.toPositive(Utils.murmur2(key)) % n;
        agree &= md.partition() == hashed;
        System.out.println(s + " " + md.partition() + " " + hashed);
      }
    }
    System.exit(agree ? 0 : 1);
  }
}
